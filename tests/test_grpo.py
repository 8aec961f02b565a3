"""GRPO: on a verifiable toy task (`say c` -> `c`, checked by exact match) a briefly fine-tuned
policy that is right about a third of the time gets clearly better; runs resume exactly
(sampling is seeded by the data position); advantages and loss follow their formulas."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignment_helpers import make_start, metrics, write_jsonl
from openllama.cli import main
from openllama.train.grpo import group_advantages, grpo_loss, read_prompts
from test_sft import LETTERS, copy_chats


def test_group_advantages_and_loss_direction():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]), 4)
    assert adv[:4].sum().abs() < 1e-5 and adv[0] > 0 > adv[1]
    assert torch.all(adv[4:] == 0)  # a group that all agree carries no signal
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    loss, m = grpo_loss(logp, logp.detach(), logp.detach(), mask, torch.tensor([1.0, -1.0]), 0.2, 0.1)
    loss.backward()
    assert (logp.grad[0, :2] < 0).all() and (logp.grad[1] > 0).all() and logp.grad[0, 2] == 0
    assert m["kl"] == 0.0


def test_grpo_loss_clips_and_adds_k3_kl_as_computed_by_hand():
    # one completion of 2 tokens (the third is masked), advantage +1, clip 0.2, beta 0.5
    # token 1: ratio e^0.5 = 1.6487 > 1.2 -> clipped term min(1.6487, 1.2) * 1 = 1.2, no gradient
    # token 2: ratio e^-0.1 = 0.9048, inside the clip range -> 0.9048
    # k3 KL, d = ref - pi: token 1 d = -0.5: e^-0.5 + 0.5 - 1 = 0.106531; token 2 d = 0.3:
    # e^0.3 - 0.3 - 1 = 0.049859
    logp = torch.tensor([[-1.0, -2.0, -9.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.9, -9.0]])
    ref = torch.tensor([[-1.5, -1.7, 0.0]])
    mask = torch.tensor([[True, True, False]])
    loss, m = grpo_loss(logp, old, ref, mask, torch.tensor([1.0]), clip_eps=0.2, beta=0.5)
    kl1, kl2 = math.exp(-0.5) + 0.5 - 1, math.exp(0.3) - 0.3 - 1
    expected = ((-1.2 + 0.5 * kl1) + (-math.exp(-0.1) + 0.5 * kl2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["kl"] == pytest.approx((kl1 + kl2) / 2, rel=1e-6)
    loss.backward()
    # d/dlogp: token 1 only the KL term, beta * (1 - e^d) / 2; token 2 -ratio / 2 + beta * (1 - e^d) / 2
    assert logp.grad[0, 0].item() == pytest.approx(0.5 * (1 - math.exp(-0.5)) / 2, rel=1e-5)
    assert logp.grad[0, 1].item() == pytest.approx((-math.exp(-0.1) + 0.5 * (1 - math.exp(0.3))) / 2, rel=1e-5)
    assert logp.grad[0, 2] == 0
    # a negative advantage clips below: ratio 0.5 -> -min(0.5 * -1, clip(0.5) = 0.8 * -1) = 0.8
    loss, _ = grpo_loss(torch.tensor([[math.log(0.5)]]), torch.zeros(1, 1), torch.tensor([[math.log(0.5)]]),
                        torch.tensor([[True]]), torch.tensor([-1.0]), clip_eps=0.2, beta=0.0)
    assert loss.item() == pytest.approx(0.8)  # -min(0.5 * -1, 0.8 * -1) = 0.8


def test_shared_prompt_rows_equal_one_row_per_completion():
    # GRPO scores G completions of a prompt in one row (the prompt once, each completion a branch
    # that sees only the prompt and itself): log-probs and gradients equal separate rows
    from openllama.labels import IGNORE_INDEX, SharedPrompts, token_logprobs
    from openllama.model import Llama, ModelConfig

    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
    prompts = [[1, 5, 9, 12], [1, 7]]
    completions = [[[3, 4, 2], [8], [3, 3, 3, 3, 2]], [[6, 2], [10, 11, 2], [2]]]
    shared = SharedPrompts(prompts, completions, pad_id=0)
    got = shared.logprobs(model)
    got.sum().backward()
    grads = [q.grad.clone() for q in model.parameters()]
    model.zero_grad()
    want = torch.zeros_like(got)
    for i, (prompt, c) in enumerate((p, c) for p, cs in zip(prompts, completions) for c in cs):
        tokens = torch.tensor([prompt + c])
        labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + c])
        row = token_logprobs(model, tokens, labels)[0, len(prompt) - 1:len(prompt) - 1 + len(c)]
        row.sum().backward()
        want[i, :len(c)] = row.detach()
    assert shared.mask.sum(-1).tolist() == [3, 1, 5, 2, 3, 1]
    assert torch.allclose(got.detach(), want, atol=1e-5) and (got[~shared.mask] == 0).all()
    for q, g in zip(model.parameters(), grads):
        assert torch.allclose(q.grad, g, atol=1e-5)
    # the prompt is computed once: 3 + 3 x 1 + 9 completion tokens, not 3 x 4 + 9
    assert shared.num_tokens == (3 + 3 + 9) + (1 + 3 + 6)
    # long completions: one row per completion (plain causal, no mask) gives the same numbers
    separate = SharedPrompts(prompts, completions, pad_id=0, separate=True)
    assert separate.attn_mask is None and separate.tokens.shape[0] == 6
    assert torch.allclose(separate.logprobs(model).detach(), want, atol=1e-5)
    assert SharedPrompts.pays([[1] * 20], [[[2] * 6] * 8], dim=128)  # the demo: 75 tokens, not 208
    assert not SharedPrompts.pays([[1] * 20], [[[2] * 256] * 8], dim=128)  # one 2,075-token row loses


def test_grpo_refuses_fsdp2_and_format(tmp_path, capsys):
    root = tmp_path
    start = make_start(root / "start", dim=32, n_layers=1)
    prompts = write_jsonl(root / "p.jsonl", [{"prompt": "say a", "answer": "a"}] * 4)
    args = ["grpo", "--model", str(start), "--data", str(prompts), "--out", str(root / "o"), "--no-progress",
            "train.max_steps=1", "train.micro_batch_size=2", "data.valid_fraction=0"]
    assert main([*args, "train.strategy=fsdp2"]) == 2
    assert "train.strategy=fsdp2: GRPOObjective generates with the model" in capsys.readouterr().err
    assert main([*args, "--format", "alpaca"]) == 2  # prompts have one format: --format is no flag here
    assert "format: unknown key" in capsys.readouterr().err


def test_prompt_file_errors(tmp_path):
    from openllama.errors import UserError

    path = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "say a", "answer": "a"},
                                               {"messages": [{"role": "user", "content": "say b"},
                                                             {"role": "assistant", "content": "b"}]},
                                               {"prompt": "say c"}])
    with pytest.raises(UserError, match=r"rl\.jsonl:3: key 'answer' must be a string"):
        read_prompts(path)
    assert [p.answer for p in read_prompts(path, on_error="skip")] == ["a", "b"]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny model fine-tuned on replies that are right half the time (`j` otherwise)."""
    root = tmp_path_factory.mktemp("grpo")
    start = make_start(root / "start", dim=64, n_layers=2)
    sft_data = write_jsonl(root / "sft.jsonl", copy_chats(correct_every=2))
    assert main(["sft", "--model", str(start), "--data", str(sft_data), "--out", str(root / "sft"), "--no-progress",
                 "data.valid_fraction=0", "train.max_steps=40", "train.micro_batch_size=8", "train.seq_len=64",
                 "optim.lr=3e-3", "optim.schedule=constant"]) == 0
    prompts = write_jsonl(root / "rl.jsonl", [{"prompt": f"say {c}", "answer": c} for c in LETTERS])
    return root, root / "sft", prompts


@pytest.mark.slow
def test_grpo_raises_mean_reward(policy):
    root, sft_run, prompts = policy
    out = root / "grpo"
    assert main(["grpo", "--model", str(sft_run), "--data", str(prompts), "--out", str(out), "--no-progress",
                 f"data.valid=[{prompts}]", "train.max_steps=30", "train.micro_batch_size=3", "grpo.group_size=8",
                 "grpo.max_new_tokens=4", "grpo.temperature=0.7", "grpo.beta=0.02", "optim.lr=1e-3",
                 "optim.schedule=constant"]) == 0
    rewards = [r["reward_mean"] for r in metrics(out, "train")]
    assert len(rewards) == 30 and all("kl" in r for r in metrics(out, "train"))
    # sampled rewards of 24 completions a step are noisy: compare the first and last 10 steps
    # (passes for start seeds 0, 1 and 2; 5-step means against +0.1 failed for all three)
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.05, rewards
    s = json.loads((out / "summary.json").read_text())
    assert s["after"]["reward_mean"] > s["before"]["reward_mean"]  # greedy exact match on the prompts


def test_grpo_resume_is_exact(tmp_path):
    root = tmp_path
    start = make_start(root / "start", dim=32, n_layers=1)
    prompts = write_jsonl(root / "rl.jsonl", [{"prompt": f"say {c}", "answer": c} for c in LETTERS])
    # scored by a (randomly initialised) reward model: graded rewards, so every group carries signal
    from openllama.model import load_model
    from openllama.train.reward_model import RewardModel

    RewardModel(load_model(start)).save_checkpoint(root / "rm")
    common = ["--model", str(start), f"grpo.reward_model={root / 'rm'}", "--data", str(prompts), "--no-progress", "data.valid_fraction=0",
              "train.max_steps=4", "train.micro_batch_size=2", "grpo.group_size=4", "grpo.max_new_tokens=3",
              "optim.lr=1e-3"]
    assert main(["grpo", "--out", str(root / "a"), *common]) == 0
    assert main(["grpo", "--out", str(root / "b"), *common, "train.halt_at_step=2"]) == 0
    assert main(["grpo", "--out", str(root / "b"), "--resume", "--no-progress"]) == 0
    ra, rb = metrics(root / "a", "train"), metrics(root / "b", "train")
    assert [(r["loss"], r["reward_mean"]) for r in ra] == [(r["loss"], r["reward_mean"]) for r in rb]
    from safetensors.torch import load_file

    a = load_file(str(root / "a" / "checkpoints" / "step_0000004" / "model" / "model.safetensors"))
    b = load_file(str(root / "b" / "checkpoints" / "step_0000004" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    before = load_file(str(start / "model.safetensors"))
    assert not all(torch.equal(a[k], before[k]) for k in a)  # the policy did move


def test_reward_model_flag_scores_samples_plus_weighted_exact_match(tmp_path, capsys):
    # RLHF: `--reward-model DIR` scores each sample with the reward model; grpo.exact_match=W adds
    # W x the verifiable reward; the held-out evaluation reports the task checker's rate beside it
    from openllama.chat_template import ChatTemplate
    from openllama.model import load_model
    from openllama.tokenizer import Tokenizer
    from openllama.train.grpo import GRPOConfig, GRPOObjective, RLPrompt, exact_match_reward, reward_model_fn
    from openllama.train.reward_model import RewardModel

    start = make_start(tmp_path / "start", dim=32, n_layers=1)
    RewardModel(load_model(start)).save_checkpoint(tmp_path / "rm")
    prompts = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": f"say {c}", "answer": c} for c in LETTERS])
    args = ["grpo", "--model", str(start), "--data", str(prompts), "--no-progress", "data.valid_fraction=0.25",
            "train.max_steps=2", "train.micro_batch_size=2", "grpo.group_size=2", "grpo.max_new_tokens=2"]
    assert main([*args, "--out", str(tmp_path / "o"), "--reward-model", str(tmp_path / "rm"),
                 "grpo.exact_match=0.5"]) == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert {"reward_mean", "exact_match"} <= set(s["after"])
    assert main([*args, "--out", str(tmp_path / "p"), "--reward-model", str(start)]) == 2  # a policy, no head
    assert "grpo.reward_model=" in (err := capsys.readouterr().err) and "not a reward model directory" in err
    assert main([*args, "--out", str(tmp_path / "p"), "--reward-model", str(tmp_path / "nope")]) == 2
    assert "nope: no such directory" in capsys.readouterr().err

    tok = Tokenizer.load(start)
    template = ChatTemplate.for_tokenizer(tok, tok.chat_template)
    rl = [RLPrompt([{"role": "user", "content": f"say {c}"}], c) for c in "ab"]
    cfg = GRPOConfig(reward_model=str(tmp_path / "rm"), exact_match=0.5)
    obj = GRPOObjective(rl, [], load_model(start), tok, template, cfg, 2, reward_model=cfg.reward_model)
    obj._load_reward("cpu")
    texts = ["a", "x"]
    score = reward_model_fn(str(tmp_path / "rm"), template, tok)(texts, rl)
    assert obj.reward_fn(texts, rl) == pytest.approx([s + 0.5 * e for s, e in zip(score, exact_match_reward(texts, rl))])
    assert exact_match_reward(texts, rl) == [1.0, 0.0]
    # right-padded batches score each reply at its own last token: as one at a time
    one = reward_model_fn(str(tmp_path / "rm"), template, tok, batch_size=1)(["a", "a longer reply"], rl)
    both = reward_model_fn(str(tmp_path / "rm"), template, tok)(["a", "a longer reply"], rl)
    assert both == pytest.approx(one, abs=1e-5) and one[0] != pytest.approx(one[1])


def test_select_prompts_keeps_prompts_whose_samples_disagree(tmp_path):
    # grpo.select_samples: a prompt whose K samples all get the same reward has zero advantage
    # for every sample, so it is dropped before training; none left is an error
    from openllama.chat_template import ChatTemplate
    from openllama.errors import UserError
    from openllama.model import load_model
    from openllama.tokenizer import Tokenizer
    from openllama.train.grpo import GRPOConfig, GRPOObjective, RLPrompt

    start = make_start(tmp_path / "start", dim=32, n_layers=1)
    tok = Tokenizer.load(start)
    template = ChatTemplate.for_tokenizer(tok, tok.chat_template)
    model = load_model(start)
    rl = [RLPrompt([{"role": "user", "content": f"say {c}"}], c) for c in LETTERS[:8]]
    cfg = GRPOConfig(max_new_tokens=6)

    def by_length(texts, prompts):  # varies with the sample for a-d, fixed for the others
        return [float(len(t) % 2) if p.answer in "abcd" else 1.0 for t, p in zip(texts, prompts)]

    obj = GRPOObjective(list(rl), [], model, tok, template, cfg, 2, reward_fn=by_length)
    stats = obj.select_prompts(model, samples=6)
    kept = [p.answer for p in obj.prompts]
    assert stats["scored"] == 8 and stats["kept"] == len(kept) > 0 and set(kept) <= set("abcd")
    again = GRPOObjective(list(rl), [], model, tok, template, cfg, 2, reward_fn=by_length)
    assert again.select_prompts(model, samples=6) == stats  # seeded: the same selection on resume
    fixed = GRPOObjective(list(rl), [], model, tok, template, cfg, 2, reward_fn=lambda t, p: [1.0] * len(t))
    with pytest.raises(UserError, match="select_samples=6: every scored prompt got the same reward"):
        fixed.select_prompts(model, samples=6)


def test_runs_written_with_the_old_reward_key_still_load():
    # config.yaml of a run from before grpo.reward_model has `grpo.reward: exact_match | DIR`
    from openllama.train.grpo import GRPOConfig

    assert GRPOConfig.model_validate({"reward": "exact_match"}).reward_model == ""
    assert GRPOConfig.model_validate({"reward": "runs/rm"}).reward_model == "runs/rm"
    with pytest.raises(Exception, match="rewards"):
        GRPOConfig.model_validate({"rewards": "runs/rm"})  # anything else unknown is still refused
