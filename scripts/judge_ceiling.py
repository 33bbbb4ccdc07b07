"""What a model's own likelihood knows about the built-in preference pairs: the knowledge a reward
model or a judge trained on its body starts from.

For each pair (the pairs `rlctl rm` trains and evaluates on, by default), it compares the model's
log-likelihood of the two replies after the prompt's chat, log p(reply | prompt) summed over the
reply's tokens, and counts the pair as known when the chosen reply is the likelier. Then, per
held-out problem, it asks which number the model finds likeliest as the whole reply and as "The
answer is {x}." among 0 … 2·(10^digits − 1): the sums it knows outright.

    python scripts/judge_ceiling.py                                   # the embedded SmolLM2-135M
    python scripts/judge_ceiling.py --model runs/sft/checkpoints/final --threads 1

Prints the share per kind of pair (held-out and training) and the held-out problems the model's
argmax gets right. A trained reward reads the same body: on wrong-number pairs of held-out sums it
has nothing to go on beyond what this prints.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

REPLY_FORMS = ("{x}", "The answer is {x}.")


def reply_log_likelihood(model, tokenizer, prompt: list[dict], reply: str) -> float:
    """Σ_t log p(reply_t | prompt, reply_<t), the prompt rendered with the chat template's assistant turn opened."""
    context = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    reply_ids = tokenizer(reply, add_special_tokens=False).input_ids
    ids = torch.tensor([context_ids + reply_ids])
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    token_log_probs = log_probs[torch.arange(len(targets)), targets]
    return token_log_probs[len(context_ids) - 1 :].sum().item()


def known_pairs(model, tokenizer, pairs) -> dict[str, tuple[int, int]]:
    """{kind: (pairs whose chosen reply is the likelier, pairs)}."""
    counts = defaultdict(lambda: [0, 0])
    for pair in pairs:
        chosen = reply_log_likelihood(model, tokenizer, pair.prompt, pair.chosen[-1]["content"])
        rejected = reply_log_likelihood(model, tokenizer, pair.prompt, pair.rejected[-1]["content"])
        counts[pair.kind][0] += chosen > rejected
        counts[pair.kind][1] += 1
    return {kind: tuple(count) for kind, count in sorted(counts.items())}


def known_sums(model, tokenizer, pairs, digits: int) -> dict[str, tuple[int, int]]:
    """{reply form: (held-out problems whose likeliest number is the answer, problems)}."""
    problems = {}
    for pair in pairs:  # one prompt per problem; origin is "arithmetic:<expression>"
        problems.setdefault(pair.origin.split(":", 1)[1], pair.prompt)
    candidates = range(0, 2 * (10**digits - 1) + 1)
    results = {}
    for form in REPLY_FORMS:
        right = 0
        for expression, prompt in problems.items():
            scores = {x: reply_log_likelihood(model, tokenizer, prompt, form.format(x=x)) for x in candidates}
            right += max(scores, key=scores.get) == eval(expression, {"__builtins__": {}})  # "3 + 4", built-in only
        results[form] = (right, len(problems))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m", help="model.path of the body to read")
    parser.add_argument("--seed", type=int, default=0, help="data.seed of the built-in pairs (rlctl rm's)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from omegaconf import OmegaConf

    from rlctl import models
    from rlctl.config import PreferenceDataConfig, fill
    from rlctl.data.preferences import PreferenceSpec, load_pairs

    data = OmegaConf.structured(PreferenceDataConfig)
    data.seed = args.seed
    spec = fill("data", data, PreferenceSpec)
    train, held_out = load_pairs(spec)
    tokenizer = models.load_tokenizer(args.model)
    model = models.load_causal_lm(args.model, tokenizer, "float32").eval()

    print(f"{args.model}: the chosen reply likelier than the rejected one, log p(reply | prompt)")
    for name, pairs in (("held-out", held_out), ("training", train)):
        counts = known_pairs(model, tokenizer, pairs)
        total = sum(right for right, _ in counts.values()), sum(n for _, n in counts.values())
        line = "  ".join(f"{kind} {right}/{n} = {right / n:.3f}" for kind, (right, n) in counts.items())
        print(f"  {name:9s} overall {total[0]}/{total[1]} = {total[0] / total[1]:.3f}  {line}")
    print("held-out problems whose likeliest reply holds the right number:")
    for form, (right, n) in known_sums(model, tokenizer, held_out, spec.digits).items():
        print(f"  reply {form!r}: {right}/{n}")


if __name__ == "__main__":
    main()
