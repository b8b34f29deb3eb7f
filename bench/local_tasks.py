"""Two lm-evaluation-harness tasks built from any plain text, for scoring models offline with EVAL.py --tasks.

    python bench/local_tasks.py --text emma.txt --out tasks/ [--docs 200] [--seed 0]
    python EVAL.py --model out --tasks text_cloze,text_bpb --include-path tasks/

- text_cloze (multiple_choice, acc and acc_norm): a sentence of the text without its last word, and four
  endings: that word, and three words of the same length class drawn from elsewhere in the text. A model
  that reads the sentence picks the right one more often than the 25% of chance.
- text_bpb (loglikelihood_rolling, bits_per_byte): whole paragraphs, scored token by token.

Paragraphs are the text's blank-line-separated blocks; sentences those of 8 to 40 words ending in "." from
paragraphs drawn with --seed. Nothing here is trained on; give it a text your model has not seen.
"""
import argparse
import json
import os
import random
import re

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""


def paragraphs(text):
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if len(p.split()) >= 20]


def cloze(paras, n, rng):
    """{"question", "choices", "answer"} rows: a sentence's words but its last, and four candidate endings."""
    vocab = sorted({w for p in paras for w in re.findall(r"[A-Za-z]+", p) if len(w) > 2})
    rows = []
    for p in rng.sample(paras, len(paras)):
        for s in re.findall(r"[^.!?]*\.", p):
            words = s.split()
            if 8 <= len(words) <= 40 and re.fullmatch(r"[a-z]+\.", words[-1]):
                last = words[-1][:-1]
                others = rng.sample([w for w in vocab if abs(len(w) - len(last)) <= 1 and w.lower() != last], 3)
                choices = [last] + [w.lower() for w in others]
                rng.shuffle(choices)
                rows.append({"question": " ".join(words[:-1]), "choices": [f" {c}." for c in choices],
                             "answer": choices.index(last)})
                break
        if len(rows) == n:
            return rows
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng, out = random.Random(args.seed), os.path.abspath(args.out)
    paras = paragraphs(open(args.text, encoding="utf-8").read())
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "cloze.jsonl"), "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in cloze(paras, args.docs, rng))
    with open(os.path.join(out, "bpb.jsonl"), "w") as fh:
        fh.writelines(json.dumps({"text": p}) + "\n" for p in rng.sample(paras, min(args.docs, len(paras))))
    with open(os.path.join(out, "text_cloze.yaml"), "w") as fh:  # the endings carry their own leading space
        fh.write(TASK.format(name="text_cloze", data=os.path.join(out, "cloze.jsonl"))
                 + 'output_type: multiple_choice\ntarget_delimiter: ""\ndoc_to_text: "{{question}}"\n'
                 'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
                 'metric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    with open(os.path.join(out, "text_bpb.yaml"), "w") as fh:
        fh.write(TASK.format(name="text_bpb", data=os.path.join(out, "bpb.jsonl"))
                 + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                 'metric_list:\n  - metric: bits_per_byte\n')
    print(f"wrote text_cloze and text_bpb in {out}")


if __name__ == "__main__":
    main()
