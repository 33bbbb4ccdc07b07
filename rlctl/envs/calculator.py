"""The built-in calculator: ``env=calculator``. The policy writes an arithmetic expression in a tool
call; a small evaluator (numbers, + − × ÷, parentheses, unary minus; never ``eval``) works it out
exactly and returns the result, or an error the policy can read."""

from __future__ import annotations

import ast
from fractions import Fraction

from rlctl.envs.tools import ToolEnvironment

MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 10**30  # a result past this is refused (no exponent operator, but products of long numbers)
_SYMBOLS = str.maketrans({"×": "*", "÷": "/", "−": "-", "–": "-"})
_OPERATORS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def evaluate_expression(expression: str) -> Fraction:
    """The exact value of an arithmetic expression: integers and decimals, + - * / (also × ÷ −),
    parentheses and unary signs. Anything else (names, calls, powers, …) raises ValueError; so does
    division by zero."""
    text = expression.translate(_SYMBOLS).strip()
    if not text:
        raise ValueError("the expression is empty")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot read {expression!r} as arithmetic") from None
    return _value(tree.body)


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _value(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError("division by zero")
        result = _OPERATORS[type(node.op)](left, right)
        if abs(result) > MAX_MAGNITUDE:
            raise ValueError("the result is too large")
        return result
    raise ValueError(f"only numbers, + - * / and parentheses are allowed, not {ast.unparse(node)!r}")


def format_number(value: Fraction) -> str:
    """An integer as itself ("56088"); anything else to 6 decimal places, trailing zeros dropped."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.6f}".rstrip("0").rstrip(".")


def calculator(expression: str) -> str:
    """Work out an arithmetic expression exactly.

    Args:
        expression: numbers with + - * / and parentheses, for example "(12 + 3) * 4"
    """
    return format_number(evaluate_expression(expression))


class CalculatorEnvironment(ToolEnvironment):
    """``env=calculator``: the tool environment with one tool, :func:`calculator`."""

    def __init__(self, timeout_s: float = 5.0):
        super().__init__([calculator], timeout_s)
