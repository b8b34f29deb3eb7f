"""The GRPO example of docs/training.md: which person does an Austen passage name? The prompts, a reward that checks
the answer, and the accuracy of a model's answers.

    python docs/grpo_names.py data/train.txt 400 > names-train.jsonl       # Pride and Prejudice: training prompts
    python docs/grpo_names.py data/train.jsonl 100 > names-heldout.jsonl   # Persuasion: held-out prompts
    python docs/grpo_names.py --score names-heldout.jsonl answers.jsonl    # answers: INFER.py --each-line --jsonl
"""
import json
import re
import sys

TITLED = re.compile(r"\b(?:Mr|Mrs|Miss|Lady|Sir|Colonel|Captain)\.? [A-Z][a-z]+")
QUESTION = "Passage: {} Question: Which person does the passage mention? Answer with just their name, for example: Mr Darcy."


def plain(text):
    return text.replace(".", "").replace('"', "").strip()  # "Mr. Elliot" is Persuasion's "Mr Elliot"


def name_only(prompts, completions, passage, **kw):
    """1 when the answer is just a name (one to four capitalised words) that the passage contains, else 0."""
    out = []
    for c, text in zip(completions, passage):
        words = plain(c[0]["content"]).split()
        ok = 0 < len(words) <= 4 and all(w[0].isupper() for w in words) and " ".join(words) in plain(text)
        out.append(1.0 if ok else 0.0)
    return out


def mentions(prompts, completions, passage, **kw):
    """1 when the answer contains a titled name of the passage (Mr Elliot, Lady Russell), however long it is."""
    return [float(any(plain(name) in plain(c[0]["content"]) for name in TITLED.findall(text)))
            for c, text in zip(completions, passage)]


def accuracy(rows, answers):
    """The share of answers (INFER.py --jsonl lines) that name_only accepts."""
    rewards = name_only(None, [[{"content": a["completion"]}] for a in answers], [r["passage"] for r in rows])
    return sum(rewards) / len(rewards)


if __name__ == "__main__":
    if sys.argv[1] == "--score":  # python names.py --score heldout.jsonl answers.jsonl
        rows, answers = ([json.loads(l) for l in open(p)] for p in sys.argv[2:4])
        print(f"{accuracy(rows, answers):.1%} of {len(rows)} answers are a name from the passage")
        sys.exit()
    source, n = sys.argv[1], int(sys.argv[2])  # python names.py data/train.txt N > prompts.jsonl
    lines = [json.loads(l)["text"] if source.endswith(".jsonl") else l.strip() for l in open(source)]
    kept = [t for t in lines if 150 <= len(t) <= 500 and TITLED.search(t)][:n]
    for t in kept:
        print(json.dumps({"prompt": [{"role": "user", "content": QUESTION.format(t)}], "passage": t}))
