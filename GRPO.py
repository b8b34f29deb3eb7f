"""Reinforcement learning with verifiable rewards (GRPO, --grpo), one objective of the loop (its parts: SFT.py).

Each optimizer step takes the next prompts of the seeded order and, for each, samples num_generations
completions from the current policy (GENERATE.generate: batched, with a KV cache, stopping at the end of turn).
The user's reward functions score every completion; a completion's advantage is its reward relative to the
other completions of its prompt; the loss is TRL 1.16 GRPOTrainer's default (loss_type "dapo",
scale_rewards "group", num_iterations 1):

    A      = (r - mean(r of the group)) / (std(r of the group) + 1e-4)
    ratio  = π(token) / π_old(token) = exp(logp - logp.detach())        1 in value; its gradient is ∇logp
    loss   = Σ over completion tokens of -min(ratio A, clip(ratio, 1 - ε, 1 + ε) A) [+ β KL(π, π_ref)]
             / the completion tokens of the global batch

A reward function is TRL's: fn(prompts, completions, completion_ids, **columns) -> a float (or None: not
applicable) per completion, where columns are the prompt rows' other fields (a reference answer, test cases).
"""
import contextlib
import dataclasses
import importlib.util
import math
import os
import sys
import traceback
import types

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import BATCHES
import GENERATE
import LOSS
import MODEL
from BATCHES import Step
from CHAT import parse, template, with_template
from REPORT import UserError, first_line, log, suggest
from SOURCES import rows


# what a model's generation_config.json may set that would change the distribution sampled from, set back to
# nothing as TRL does: the completions must come from the temperature-scaled policy that the loss scores
NEUTRAL = dict(repetition_penalty=1.0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
               no_repeat_ngram_size=0)
# the names a reward function is called with; a column of the data may not take one of them
CALL = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


@dataclasses.dataclass(frozen=True)
class Prompt:
    ids: list       # token ids to continue (a conversation: its chat template, ready for the assistant's answer)
    prompt: object  # as the row gave it, a string or a list of messages: what the reward functions receive
    columns: dict   # the row's other fields, passed to the reward functions by name
    where: object   # the row's place, for errors


def read_prompts(sources, tokenizer, room):
    """Every prompt-only row of the sources (all their columns kept), tokenized; a prompt longer than `room`
    tokens keeps its end (GENERATE.fit_context's rule, one warning)."""
    prompts, long = [], 0
    for source in sources:
        for row, where in rows(source, every_column=True):
            kind, sample = parse(row, where)
            if kind != "prompt_only":
                raise UserError(f"{where}: a {kind} row among prompts - --grpo trains on rows of a prompt alone "
                                "({\"prompt\": …} and the fields the rewards read)")
            text, clash = sample["prompt"], next((k for k in row if k in CALL), None)
            if clash:
                raise UserError(f"{where}: a column named {clash!r}, the name of an argument of the reward functions "
                                f"- rename it (--columns cannot: it maps to LLM-MINI's keys)")
            if isinstance(text, list):  # a conversation: through the template (ChatML where the tokenizer has none)
                rendered = template(with_template(tokenizer), text, where, generation_prompt=True)
                ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]  # the template holds BOS etc.
            else:
                ids = tokenizer(text)["input_ids"]  # as INFER.py feeds a prompt
            long += len(ids) > room
            prompts.append(Prompt(ids[-room:], row["prompt"], {k: v for k, v in row.items() if k != "prompt"}, where))
    if long:
        log(f"warning: {long} prompts are longer than {room} tokens (max_length less max_completion_length); "
            "their beginnings were dropped")
    return prompts


def load_rewards(specs):
    """[(FILE.py:NAME, function)] of --reward values: each file imported once, only when named."""
    modules, found = {}, []
    for spec in specs:
        path, _, name = spec.rpartition(":")
        if not path.endswith(".py") or not name:
            raise UserError(f"training.reward: {spec!r} - give a Python file and a function in it, FILE.py:NAME")
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such reward file (--reward {spec}) - check the path")
        if path not in modules:
            modules[path] = import_file(path)
        fn = getattr(modules[path], name, None)
        if not callable(fn):
            names = [n for n in vars(modules[path]) if callable(getattr(modules[path], n)) and not n.startswith("_")]
            raise UserError(f"{path}: no function {name!r} (--reward {spec}); it has: {', '.join(names) or 'none'}"
                            f"{suggest(name, names)}")
        if any(other.rpartition(":")[2] == name for other, _ in found):
            raise UserError(f"training.reward: two functions named {name!r} - their rewards/{name}/mean would be one; "
                            "rename one")
        found.append((spec, fn))
    return found


def import_file(path):
    """A user's Python file as a module, its own errors reported in one line naming file and line."""
    name = f"reward_{abs(hash(os.path.realpath(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would (dataclasses and pickling look it up)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        frames = traceback.extract_tb(e.__traceback__)
        mine = [f.lineno for f in frames if os.path.realpath(f.filename) == os.path.realpath(path)]
        line = e.lineno if isinstance(e, SyntaxError) else (mine[-1] if mine else "")
        raise UserError(f"{path}:{line}: importing the reward file failed ({type(e).__name__}: {first_line(e, 160)})")
    return module


def call_reward(spec, fn, group, step):
    """fn's rewards (n,) float64, NaN for None, of the completions `group` [(Prompt, text, ids)], called as TRL
    calls it (with trainer_state.global_step, and loggers that log nothing); an error names the function and the
    first prompt it fails on."""
    def call(part):
        keys = dict.fromkeys(k for p, _, _ in part for k in p.columns)  # every row's fields, None where absent
        columns = {k: [p.columns.get(k) for p, _, _ in part] for k in keys}
        return fn(prompts=[p.prompt for p, _, _ in part], completions=[c for _, c, _ in part],
                  completion_ids=[ids for _, _, ids in part], trainer_state=types.SimpleNamespace(global_step=step),
                  log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None, **columns)
    try:
        out = list(call(group))
    except Exception as e:
        where = next((p.where for p, c, ids in group if failed(call, [(p, c, ids)])), group[0][0].where)
        raise UserError(f"--reward {spec}: {type(e).__name__}: {first_line(e, 160)} (on a completion of the prompt "
                        f"at {where})")
    if len(out) != len(group):
        raise UserError(f"--reward {spec}: returned {len(out)} rewards for {len(group)} completions (of the prompts "
                        f"from {group[0][0].where}) - return one per completion, None where it does not apply")
    try:
        return np.array([math.nan if r is None else float(r) for r in out], dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"--reward {spec}: returned {next(r for r in out if not isinstance(r, (int, float)))!r} - "
                        "return a number or None per completion")


def failed(call, part):
    try:
        call(part)
        return False
    except Exception:
        return True


def group_advantages(rewards, size):
    """(n,) advantages of rewards (n,) in groups of `size` consecutive completions: (r - group mean) / (group std
    + 1e-4), NaN rewards left out of mean and std (Bessel-corrected, as TRL) and given advantage 0."""
    r = rewards.view(-1, size)
    n = (~r.isnan()).sum(1, keepdim=True)
    mean = r.nansum(1, keepdim=True) / n
    std = (((r - mean) ** 2).nansum(1, keepdim=True) / (n - 1)).sqrt()
    return torch.nan_to_num((r - mean) / (std + 1e-4), nan=0.0).view(-1), std.view(-1)


class GRPO:
    """The parts the loop calls (SFT.py lists them); the prompts are held in memory with their columns."""
    KINDS = ("prompt_only",)
    unit = "prompts"

    def __init__(self, cfg, run, sources, tokenizer, scorer):
        t = cfg.training
        self.t, self.run, self.tokenizer, self.scorer, self.val = t, run, tokenizer, scorer, None
        self.rewards = load_rewards(t.reward)
        if t.reward_weights and len(t.reward_weights) != len(self.rewards):
            raise UserError(f"training.reward_weights: {len(t.reward_weights)} weights for {len(self.rewards)} reward "
                            "functions - give one per --reward")
        try:
            self.weights = torch.tensor([float(w) for w in t.reward_weights] or [1.0] * len(self.rewards))
        except ValueError:
            raise UserError(f"training.reward_weights: {t.reward_weights} - give numbers")
        if t.max_completion_length >= t.max_length:  # a prompt and its completion fit in max_length
            raise UserError(f"training.max_completion_length: {t.max_completion_length} leaves no room for a prompt "
                            f"in max_length {t.max_length} - lower it, or raise --max-length")
        self.prompts = read_prompts(sources, tokenizer, t.max_length - t.max_completion_length)
        self.size, self.per_step = len(self.prompts), t.batch_size * t.grad_accum * run.world // t.num_generations
        stops, eos = GENERATE.stops_and_eos(tokenizer, [], chat=any(isinstance(p.prompt, list) for p in self.prompts))
        self.options = GENERATE.Options(t.max_completion_length, GENERATE.sampling_of(
            False, t.grpo_temperature, 0, 1.0) | NEUTRAL, stops, eos)  # TRL's sampling: all tokens, temperature only
        self.names = ("reward", "reward_std", *(f"rewards/{name.rpartition(':')[2]}/mean" for name, _ in self.rewards),
                      "frac_reward_zero_std", "completions/mean_length", "clip_ratio/region_mean") + (
                      ("kl",) if t.grpo_beta else ())
        self.reference = reference_of(cfg, run, scorer) if t.grpo_beta else None
        log(f"GRPO: {self.size} prompts, {self.per_step} a step x {t.num_generations} completions of at most "
            f"{t.max_completion_length} tokens; rewards {', '.join(name for name, _ in self.rewards)}")

    def prepare(self, position):
        """This rank's share of the step's prompts, their completions sampled and rewarded, cut into micro-batches
        with each completion's advantage (and reference log-probabilities); the count is the global batch's
        completion tokens (this rank's share)."""
        t, run, g = self.t, self.run, self.t.num_generations
        idx = BATCHES.sample_indices(position, self.per_step, self.size, t.seed)  # the same on every rank
        share = len(idx) // run.world
        first = run.rank * share  # this rank's prompts: positions position + first … of the seeded order
        prompts = [self.prompts[i] for i in idx[first:first + share] for _ in range(g)]
        answers = [row for j in range(share) for row in self.sample(prompts[j * g:(j + 1) * g], position + first + j)]
        # what the reward functions receive, as TRL gives it: a conversation's completion is a list of messages
        group = [(p, [{"role": "assistant", "content": row.text}] if isinstance(p.prompt, list) else row.text,
                  row.new_ids) for p, row in zip(prompts, answers)]
        step = position // self.per_step
        per_func = torch.tensor(np.stack([call_reward(spec, fn, group, step) for spec, fn in self.rewards], 1))  # (n, F)
        rewards = (per_func * self.weights).nansum(1).masked_fill(per_func.isnan().all(1), math.nan)  # (n,)
        advantages, group_std = group_advantages(rewards, g)
        seqs = [(np.array(p.ids + ids), np.array([-100] * len(p.ids) + ids), np.arange(len(p.ids) + len(ids)))
                for p, (_, _, ids) in zip(prompts, group)]
        batches = []
        for m in range(t.grad_accum):
            members = list(range(m * t.batch_size, (m + 1) * t.batch_size))
            batch = BATCHES.on(run, BATCHES.collate([seqs[i] for i in members], self.tokenizer.pad_token_id)
                               | {"advantages": advantages[members].float()})
            batches.append(batch | ({"reference": self.reference_logps(batch)} if self.reference else {}))
        totals = self.totals(per_func, rewards, group_std, group, seqs)
        count = torch.tensor(max(totals["completion tokens"], 1.0) / run.world, device=run.device)
        return Step(batches, count, int(totals["tokens"]), self.stats(totals))

    def sample(self, group, position):
        """One prompt's completions, from the current weights (eval mode: no dropout) in the run's precision,
        sampled with their own seed (the run's seed and the prompt's position in the seeded order), so that
        they do not depend on how prompts are split over ranks and micro-batches, and training's own random
        state (dropout) is left as it was."""
        model = self.scorer.model
        was_training = model.training
        model.eval()
        kind = self.run.device.type  # the device's generator is forked too (CUDA, MPS); the CPU's always is
        try:
            with torch.random.fork_rng(devices=[] if kind == "cpu" else [self.run.device],
                                       device_type="cuda" if kind == "cpu" else kind), self.run.autocast:
                torch.manual_seed(self.t.seed * 1_000_003 + position)
                return GENERATE.generate(model, self.tokenizer, [GENERATE.Row(p.ids, self.options) for p in group])
        finally:
            model.train(was_training)

    @torch.no_grad()
    def reference_logps(self, batch):
        """(B, T) the reference model's log-probabilities of the batch's completion tokens: the adapter disabled
        under LoRA, else the separate copy (reference_of)."""
        scorer, adapter = self.reference
        off = scorer.model.disable_adapter() if adapter else contextlib.nullcontext()
        was_training = scorer.model.training
        scorer.model.eval()  # no dropout: the reference is the model as it is, as DPO's
        try:
            with off, self.run.autocast:
                return scorer(batch["input_ids"], batch["position_ids"], batch["labels"], per_token=True,
                              temperature=self.t.grpo_temperature)
        finally:
            scorer.model.train(was_training)

    def totals(self, per_func, rewards, group_std, group, seqs):
        """The step's sums over every rank (one all-reduce): what the statistics and the count are made of."""
        valid = ~rewards.isnan()
        values = {"completion tokens": sum(len(ids) for _, _, ids in group), "tokens": sum(len(s[0]) for s in seqs),
                  "rewards": rewards[valid].sum(), "rewards²": (rewards[valid] ** 2).sum(), "rewarded": valid.sum(),
                  "zero std": torch.isclose(group_std, torch.zeros_like(group_std)).sum(), "groups": len(group_std),
                  "completions": len(group)}
        for i, (name, _) in enumerate(self.rewards):
            scored = ~per_func[:, i].isnan()
            values |= {f"{name} sum": per_func[scored, i].sum(), f"{name} n": scored.sum()}
        on = self.run.device if self.run.world > 1 else "cpu"  # collectives need the device; MPS has no float64
        stacked = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=on)
        if self.run.world > 1:
            dist.all_reduce(stacked)
        return dict(zip(values, stacked.tolist()))

    def stats(self, s):
        """The statistics known before the forward, as TRL names them: the global batch's value on every rank (so
        that their mean over ranks, what METRICS logs, is that value)."""
        n = max(s["rewarded"], 1)
        mean = s["rewards"] / n
        std = math.sqrt(max(s["rewards²"] - n * mean ** 2, 0.0) / max(n - 1, 1))
        values = [mean, std, *(s[f"{name} sum"] / max(s[f"{name} n"], 1) for name, _ in self.rewards),
                  s["zero std"] / s["groups"], s["completion tokens"] / s["completions"]]
        return torch.tensor(values + [0.0] * (len(self.names) - len(values)), device=self.run.device)

    def loss(self, model, batch, count):
        """The micro-batch's Σ of per-token clipped policy losses (+ β KL) / the step's completion tokens (this
        rank's share), and its share of the clip ratio and KL (token means over the same count)."""
        t = self.t
        logps = model(batch["input_ids"], batch["position_ids"], batch["labels"], per_token=True,
                      temperature=t.grpo_temperature)  # (B, T): position t holds log π(token t + 1)
        mask = (F.pad(batch["labels"], (0, 1), value=-100)[:, 1:] != -100).float()
        ratio = torch.exp(logps - logps.detach())
        a = batch["advantages"][:, None].to(logps.dtype)
        per_token = -torch.min(ratio * a, ratio.clamp(1 - t.grpo_epsilon, 1 + t.grpo_epsilon) * a)
        clipped = ((ratio < 1 - t.grpo_epsilon) & (a < 0)) | ((ratio > 1 + t.grpo_epsilon) & (a > 0))
        stats = [(clipped.float() * mask).sum()]
        if t.grpo_beta:  # k3 estimate of KL(π || π_ref), times the ratio (TRL's use_bias_correction_kl)
            delta = batch["reference"] - logps
            kl = (torch.exp(delta) - delta - 1) * ratio
            per_token = per_token + t.grpo_beta * kl
            stats.append((kl.detach() * mask).sum())
        known = len(self.names) - len(stats)  # the statistics prepare filled in; these come after them
        return (per_token * mask).sum() / count, torch.cat([torch.zeros(known, device=count.device),
                                                           torch.stack(stats) / count])


def reference_of(cfg, run, scorer):
    """(scorer of the reference, whether it is the adapter disabled): under LoRA the base itself; otherwise a
    second copy of the starting model, frozen (loaded again, so a resumed run has it too)."""
    if hasattr(scorer.model, "disable_adapter"):
        return scorer, True
    log(f"GRPO: the KL reference is a second copy of {cfg.model.name} (with --lora it is the base, at no cost)")
    model = MODEL.load_pretrained(cfg.model.name, torch.float32).to(run.device).eval()
    model.requires_grad_(False)
    return LOSS.Scorer(model, scorer.chunked), False

