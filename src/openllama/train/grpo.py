"""`openllama grpo`: online RL with group-normalised advantages (GRPO, Shao et al. 2024).

Each step, for every prompt in the batch: sample a group of G completions from the current
policy with `generate.Generator` (seeded from the data position, so a resumed run samples the
same; the G samples of a prompt share one prefill), score them (the task checker's exact match,
a trained reward model with `--reward-model DIR`, or a weighted sum of both), and set each
completion's advantage to (r - group mean) / (group std + eps). The loss on completion tokens is
the clipped policy-gradient surrogate -min(ratio * A, clip(ratio, 1-eps, 1+eps) * A) plus
beta * KL(policy || reference), with the k3 estimator exp(ref - pi) - (ref - pi) - 1 per token,
averaged per completion then over completions. The policy's and the reference's log-probs come
from one row per prompt holding its G completions as branches (`labels.SharedPrompts`: the
prompt is computed once, not G times). One optimizer step per batch of samples, so the ratio is 1
in value and the clip guards future multi-step use; the gradient is the policy gradient.
Reported: mean reward per step (+ std, KL, completion length); held out: greedy mean reward and
the task checker's exact-match rate.

Prompts: JSON lines `{"prompt": str | messages, "answer": str}` (the built-in `rl/train.jsonl`),
or any chat format whose last assistant turn is taken as the answer.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import Field, model_validator

from ..chat_template import ChatTemplate
from ..config import Section
from ..data.chat import EpochBatches, ReadReport, RecordError, read_records
from ..errors import UserError
from ..labels import SharedPrompts
from ..tasks import is_correct
from .engine import OptimConfig, TrainConfig
from .lora import LoraConfig, LoraLlama, base_llama
from .objectives import Objective
from .reward_model import load_reward_model, reward_model_dir
from .stage import is_main, load_start, read_files, run_stage, run_template, split_held_out, stage_command


class GRPOConfig(Section):
    group_size: int = 8  # completions per prompt (prompts per micro-batch: train.micro_batch_size)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    clip_eps: float = 0.2
    beta: float = 0.04  # KL penalty weight
    # reward = exact_match * (1 if the answer is right, else 0) + the reward model's score, if any;
    # exact_match None: 1 without a reward model, 0 with one (RLHF proper; give both to mix them)
    reward_model: str = ""  # a reward model directory (`openllama reward`)
    exact_match: float | None = None
    eval_prompts: int = 64  # held-out prompts scored greedily by evaluate()
    max_prompt_len: int = 256
    negative_scale: float = Field(1.0, ge=0)  # scales negative advantages (0: learn from right answers only)
    # > 0: first sample this many completions of each training prompt from the starting policy and
    # train only on prompts whose rewards differ (neither always right nor always wrong): the others
    # have zero group-normalised advantage, so they cost a step and teach nothing
    select_samples: int = 0
    select_pool: int = 0  # score (and train on) only this many prompts, a seeded shuffle's first (0: all)

    @model_validator(mode="before")
    @classmethod
    def _renamed_reward(cls, data: Any) -> Any:
        # `reward: exact_match | DIR` before it became reward_model: old runs' config.yaml still resume
        if isinstance(data, dict) and "reward" in data:
            data = dict(data)
            old = data.pop("reward")
            if old != "exact_match":
                data.setdefault("reward_model", old)
        return data


@dataclass
class RLPrompt:
    messages: list[dict[str, str]]
    answer: str
    ids: list[int] | None = None


RL_FORMAT = SimpleNamespace(name="rl", keys=("prompt", "answer"))


def read_prompt(record: Any) -> RLPrompt:
    """{"prompt": str | messages, "answer"} or {"messages"} whose last (assistant) turn is the answer."""
    from ..data.chat import _messages, _text

    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    if "prompt" in record:
        prompt = record["prompt"]
        messages = [{"role": "user", "content": _text(record, "prompt")}] if not isinstance(prompt, list) \
            else _messages(prompt, "prompt")
        answer = _text(record, "answer")
    else:
        messages = _messages(record.get("messages"), "messages")
        if messages[-1]["role"] != "assistant":
            raise RecordError("the last message must be the assistant's reference answer")
        messages, answer = messages[:-1], messages[-1]["content"]
    if messages[-1]["role"] != "user":
        raise RecordError("the prompt must end with a user message")
    return RLPrompt(messages, answer)


def read_prompts(path: str | Path, on_error: str = "raise", report: ReadReport | None = None) -> list[RLPrompt]:
    """Prompts with reference answers: {"prompt", "answer"} or {"messages"} (last turn = answer)."""
    report = report if report is not None else ReadReport()
    report.format = "rl"
    out = []
    for where, record, _ in read_records(path, RL_FORMAT, "prompt", lambda record: None, on_error, report):
        try:
            out.append(read_prompt(record))
        except RecordError as exc:
            report.malformed(f"{where}: {exc} (expected keys prompt + answer, or messages)", on_error)
    return out


RewardFn = Callable[[Sequence[str], Sequence["RLPrompt"]], list[float]]


def exact_match_reward(completions: Sequence[str], prompts: Sequence[RLPrompt]) -> list[float]:
    return [1.0 if is_correct(c, p.answer) else 0.0 for c, p in zip(completions, prompts)]


def weighted(fn: RewardFn, weight: float) -> RewardFn:
    return lambda completions, prompts: [weight * r for r in fn(completions, prompts)] if weight else \
        [0.0] * len(completions)


def summed(*fns: RewardFn) -> RewardFn:
    return lambda completions, prompts: [sum(rs) for rs in zip(*(fn(completions, prompts) for fn in fns))]


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(N,) rewards in consecutive groups -> (r - group mean) / (group std + eps)."""
    g = rewards.view(-1, group_size)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True, unbiased=False) + eps)).view(-1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
              advantages: torch.Tensor, clip_eps: float, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token log-probs (B, T) of the policy, the sampling policy and the reference, `mask` on
    completion tokens, `advantages` (B,) -> (mean over completions of the per-token mean of
    -min(ratio A, clip(ratio) A) + beta k3-KL, {"kl": mean per-token KL})."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    delta = ref_logp - logp
    kl = torch.exp(delta) - delta - 1
    per_token = -surrogate + beta * kl
    mask = mask.float()
    per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    kl_mean = ((kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    return per_seq.mean(), {"kl": kl_mean.item()}


class GRPOObjective(Objective):
    # it samples from the model, which a sharded (FSDP2) model cannot do rank by rank (see engine)
    needs_full_model = True

    def __init__(self, prompts: list[RLPrompt], held_out: list[RLPrompt], reference: torch.nn.Module,
                 tokenizer: Any, template: ChatTemplate, cfg: GRPOConfig, micro_batch_size: int, seed: int = 0,
                 reward_fn: RewardFn | None = None, reward_model: str = ""):
        self.cfg, self.tokenizer, self.template, self.seed = cfg, tokenizer, template, seed
        self.micro_batch_size = micro_batch_size  # prompts per micro-batch
        for p in list(prompts) + list(held_out):
            p.ids = template.generation_ids(p.messages, tokenizer)
        self.prompts = [p for p in prompts if len(p.ids) <= cfg.max_prompt_len]
        self.held_out = held_out[:cfg.eval_prompts]
        self.reference = copy.deepcopy(reference).eval().requires_grad_(False)
        self.reward_model = reward_model  # loaded by setup on the training device (select_prompts: the model's)
        weight = cfg.exact_match if cfg.exact_match is not None else (0.0 if reward_model else 1.0)
        self.verifiable = reward_fn or weighted(exact_match_reward, weight)
        self.reward_fn = self.verifiable if not reward_model else None
        pad = getattr(tokenizer, "pad_id", None)
        self.pad_id = pad if pad is not None and pad >= 0 else 0

    def setup(self, accelerator) -> None:
        self.reference.to(accelerator.device)
        self._load_reward(accelerator.device)

    def _load_reward(self, device) -> None:
        if self.reward_model:
            score = reward_model_fn(self.reward_model, self.template, self.tokenizer, device)
            self.reward_fn = summed(score, self.verifiable)

    def train_batches(self, rank: int, world: int) -> EpochBatches:
        batches = EpochBatches(self.prompts, self.micro_batch_size, rank=rank, world=world, seed=self.seed)
        batches.collate = lambda items: {"prompts": items, "position": dict(batches.state_dict()), "rank": rank}
        return batches

    def _sample(self, model, prompts: Sequence[RLPrompt], n: int, temperature: float, seed: int):
        from ..generate import Generator, SamplingParams

        policy = getattr(model, "module", model)  # DDP; peft models forward attributes to the Llama
        was = policy.training
        gen = Generator(policy, self.tokenizer, max_seq_len=base_llama(policy).cfg.max_seq_len)
        params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens, temperature=temperature,
                                top_k=self.cfg.top_k, seed=seed)
        ids = [p.ids for p in prompts for _ in range(n)]
        seeds = [seed * 100_003 + i for i in range(len(ids))]
        done = gen.generate(ids, params, seeds=seeds)
        policy.train(was)
        return done

    def loss(self, model, batch):
        G = self.cfg.group_size
        pos = batch["position"]
        seed = hash((self.seed, pos["epoch"], pos["batch"], batch["rank"])) % (2 ** 31)
        prompts = batch["prompts"]
        completions = self._sample(model, prompts, G, self.cfg.temperature, seed)
        expanded = [p for p in prompts for _ in range(G)]
        texts = [c.text for c in completions]
        rewards = torch.tensor(self.reward_fn(texts, expanded), dtype=torch.float32)
        device = next(model.parameters()).device
        adv = group_advantages(rewards, G)
        adv = torch.where(adv < 0, adv * self.cfg.negative_scale, adv).to(device)
        # one row per prompt, its G completions as branches (the prompt computed once, not G times),
        # unless the completions are so long that attention over one long row costs more
        ids = [p.ids for p in prompts]
        groups = [[c.token_ids for c in completions[i * G:(i + 1) * G]] for i in range(len(prompts))]
        separate = not SharedPrompts.pays(ids, groups, base_llama(model).cfg.dim)
        rows = SharedPrompts(ids, groups, self.pad_id, separate=separate).to(device)
        logp = rows.logprobs(model)
        with torch.no_grad():
            ref_logp = rows.logprobs(self.reference)
        loss, metrics = grpo_loss(logp, logp.detach(), ref_logp, rows.mask, adv, self.cfg.clip_eps, self.cfg.beta)
        metrics.update(reward_mean=rewards.mean().item(), reward_std=rewards.std(unbiased=False).item(),
                       completion_len=float(rows.mask.sum(-1).float().mean().item()))
        # tokens the model processed, padding left out (shared rows: each prompt once, plus its last
        # token again per completion)
        return loss, metrics, rows.num_tokens

    @torch.no_grad()
    def select_prompts(self, model, samples: int, pool: int = 0, chunk: int = 32) -> dict[str, Any]:
        """Keep the training prompts whose `samples` sampled rewards under `model` differ (of the
        first `pool` of a seeded shuffle, 0: all; the rest are not trained on); returns how many
        were scored and kept, and the mean pass rate before and after."""
        if self.reward_fn is None:
            self._load_reward(next(model.parameters()).device)
        order = list(range(len(self.prompts)))
        random.Random(f"{self.seed}:select").shuffle(order)
        scored = [self.prompts[i] for i in order[:pool or None]]
        rates = []
        for lo in range(0, len(scored), chunk):
            part = scored[lo:lo + chunk]
            done = self._sample(model, part, samples, self.cfg.temperature, self.seed * 7919 + lo)
            r = torch.tensor(self.reward_fn([c.text for c in done], [p for p in part for _ in range(samples)]))
            r = r.view(len(part), samples)
            rates += [(float(row.mean()), bool(row.max() > row.min())) for row in r]
        self.prompts = [p for p, (_, varies) in zip(scored, rates) if varies]
        if not self.prompts:
            raise UserError(f"grpo.select_samples={samples}: every scored prompt got the same reward on all "
                            f"samples; nothing to learn from (select_samples=0 trains on all)")
        kept = [r for r, varies in rates if varies]
        return {"scored": len(scored), "kept": len(kept), "pass_rate_scored": sum(r for r, _ in rates) / len(rates),
                "pass_rate_kept": sum(kept) / len(kept)}

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """Greedy answers on held-out prompts: mean reward (accuracy for exact match)."""
        if not self.held_out:
            return {}
        if self.reward_fn is None:
            self._load_reward(next(model.parameters()).device)
        done = self._sample(model, self.held_out, 1, 0.0, self.seed)
        texts = [c.text for c in done]
        rewards = self.reward_fn(texts, self.held_out)
        # the task checker too: with a reward model it is the held-out judge the reward never saw
        right = exact_match_reward(texts, self.held_out)
        return {"reward_mean": sum(rewards) / len(rewards), "exact_match": sum(right) / len(right)}


# ----------------------------------------------------------------------------------------------
# The stage


class PromptData(Section):
    train: list[str] = []  # prompt files: {"prompt", "answer"} or {"messages"} JSON lines
    on_error: Literal["raise", "skip"] = "raise"
    valid: list[str] = []  # held-out prompts; else valid_fraction of train
    valid_fraction: float = 0.1
    template: str | None = None


class GRPOStageConfig(Section):
    init: str = ""  # the starting policy, also the KL reference
    data: PromptData = PromptData()
    grpo: GRPOConfig = GRPOConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig
    optim: OptimConfig = OptimConfig(lr=1e-5, weight_decay=0.0)


def reward_model_fn(path: str, template: ChatTemplate, tokenizer: Any, device: torch.device | str = "cpu",
                    batch_size: int = 64):
    """A reward function backed by a trained reward model directory, loaded on `device`: each
    prompt + reply scored at its last token, right-padded batches of `batch_size`."""
    rm = load_reward_model(path, device)
    pad = getattr(tokenizer, "pad_id", None)
    pad = pad if pad is not None and pad >= 0 else 0

    @torch.no_grad()
    def score(completions: Sequence[str], prompts: Sequence[RLPrompt]) -> list[float]:
        rows = [template.encode(p.messages + [{"role": "assistant", "content": text.strip()}], tokenizer).ids
                [-rm.cfg.max_seq_len:] for text, p in zip(completions, prompts)]
        out: list[float] = []
        for lo in range(0, len(rows), batch_size):
            part = rows[lo:lo + batch_size]
            tokens = torch.full((len(part), max(map(len, part))), pad, dtype=torch.long)
            for i, ids in enumerate(part):
                tokens[i, :len(ids)] = torch.tensor(ids)
            lengths = torch.tensor([len(ids) for ids in part])
            out += rm(tokens.to(rm.score.weight.device), lengths.to(rm.score.weight.device)).tolist()
        return out

    return score


def grpo(cfg: GRPOStageConfig, out, resume: bool = False, progress: bool = True) -> dict:
    out = Path(out)
    if not cfg.data.train:
        raise UserError("no training prompts: pass --data FILE or set data.train=[...]")
    reward_model = cfg.grpo.reward_model
    if reward_model:
        try:
            reward_model = str(reward_model_dir(reward_model))
        except UserError as exc:
            raise UserError(f"grpo.reward_model={exc}") from None
    model, tok, tok_dir = load_start(cfg.init)
    template, run_tok_dir = run_template(cfg.data.template, tok, tok_dir, out)
    prompts, report = read_files(cfg.data.train, read_prompts, on_error=cfg.data.on_error)
    if cfg.data.valid:
        held, _ = read_files(cfg.data.valid, read_prompts, on_error=cfg.data.on_error)
    else:
        prompts, held = split_held_out(prompts, cfg.data.valid_fraction, cfg.train.seed)
    objective = GRPOObjective(prompts, held, model, tok, template, cfg.grpo, cfg.train.micro_batch_size,
                              cfg.train.seed, reward_model=reward_model)
    if cfg.grpo.select_samples:
        report["selection"] = objective.select_prompts(model, cfg.grpo.select_samples, cfg.grpo.select_pool)
    report.update(prompts=len(objective.prompts), held_out=len(objective.held_out))
    if is_main():
        print(f"grpo data: {json.dumps(report)}")
    if cfg.lora.enabled:
        model = LoraLlama(model, cfg.lora)
    return run_stage(cfg, model, objective, out, resume, run_tok_dir, progress, report)


ACCEPTS_OVERRIDES = True  # leftover `key.path=value` arguments are config overrides (see cli.py)

# no --format: prompts have one format (prompt + answer, or messages ending with the answer)
add_arguments, run = stage_command(
    GRPOStageConfig, grpo, "prompt file(s): JSON lines {prompt, answer} (or messages ending with the answer)",
    formats=False, extra={"--reward-model": ("grpo.reward_model", "score samples with this reward model "
                                                                   "directory (RLHF); grpo.exact_match=W adds "
                                                                   "the verifiable reward")})
