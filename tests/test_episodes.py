"""Multi-turn episodes (trainer/rl/episodes.py, rendering.py, rollouts.py) on the real hf engine and a tiny model.

    token exactness   a 3-turn episode: what the engine was sent each turn is the episode's ids so far, byte for
                      byte; what it returned is in the trajectory as returned (stop token included); each
                      environment segment decodes to exactly the template's rendering of the replies alone
    masks             sampled tokens carry loss, log-probs and versions; environment and template tokens none
    budgets           max_turns, max_episode_tokens, max_new_tokens: truncated, marked, and what
                      rollout.truncated says (mask, overlong_penalty)
    failures          an environment that raises drops its episode; past the bound the step fails naming the
                      environment and the task; a reply that is not a list of messages names the class
    template          one that re-renders earlier turns (drops <think> blocks) is refused with the fix named
"""

from __future__ import annotations

import pytest
import torch

from trainer.data.tokenizer import load_tokenizer
from trainer.rl.episodes import Budgets, EpisodeRunner
from trainer.rl.rendering import EpisodeRenderer, TemplateError, check_template
from trainer.rl.rollout.base import SamplingSettings, stop_token_ids

TOKENIZER = load_tokenizer("builtin")
STOPS = stop_token_ids(TOKENIZER)
REPLIES = ["Try again: be more specific.", "Almost. One more time."]


class Recorder:
    """A rollout engine's calls, recorded around the real engine."""

    def __init__(self, engine):
        self.engine, self.sent, self.returned, self.routes, self.version = engine, [], [], [], engine.version

    def sample(self, prompts, settings, routes=None):
        self.sent.append([list(p) for p in prompts])
        self.routes.append(list(routes))
        out = self.engine.sample(prompts, settings, routes)
        self.returned.append([[list(c.token_ids) for c in group] for group in out])
        return out

    def greedy(self, prompts, *, max_new_tokens):
        return self.engine.greedy(prompts, max_new_tokens=max_new_tokens)


class ThreeTurnEnv:
    """Replies twice, then ends: three model turns."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def reset(self, row):
        return [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": row["prompt"]}]

    def step(self, messages, row):
        turn = sum(m["role"] == "assistant" for m in messages)
        if turn > len(REPLIES):
            return [], True
        return [{"role": "user", "content": REPLIES[turn - 1]}], False

    def reward(self, messages, row):
        return {"turns": float(sum(m["role"] == "assistant" for m in messages))}


@pytest.fixture(scope="module")
def hf_engine():
    from models.tiny import tiny_model
    from trainer.rl.rollout.hf import HFRolloutEngine
    model = tiny_model("qwen3", seed=0, vocab_size=len(TOKENIZER), hidden_size=64, num_layers=2)
    engine = HFRolloutEngine(model, TOKENIZER, torch.device("cpu"))
    engine.sync(model, 0)
    return engine


def _settings(n=2, max_new_tokens=12, seed=3):
    return SamplingSettings(n=n, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, seed=seed)


def _runner(env=ThreeTurnEnv, **budgets):
    values = {"max_turns": 8, "max_new_tokens": 12, "max_episode_tokens": 512, **budgets}
    return EpisodeRunner(env, TOKENIZER, STOPS, Budgets(**values))


def _force_stop(engine, every: int):
    """The engine's turns end at a stop token after at most `every` tokens: a random tiny model rarely samples one,
    and the test needs complete turns (the sampled prefix is kept exactly; only where it ends is chosen)."""
    class Stopping:
        version = engine.version

        def sample(self, prompts, settings, routes=None):
            out = engine.sample(prompts, settings, routes)
            for group in out:
                for c in group:
                    if not c.token_ids or c.token_ids[-1] not in STOPS:  # NaN: a log-prob no engine computed
                        c.token_ids = c.token_ids[:every - 1] + [STOPS[0]]
                        c.logprobs = c.logprobs[:every - 1] + [float("nan")]
                        if c.token_versions is not None:
                            c.token_versions = c.token_versions[:every - 1] + c.token_versions[-1:]
            return out
    return Stopping()


def turn_spans(e) -> list[tuple[int, int]]:
    """(start, end) in e.ids of each sampled turn."""
    spans, start = [], None
    for i, sampled in enumerate(e.sampled + [False]):
        if sampled and start is None:
            start = i
        if not sampled and start is not None:
            spans.append((start, i))
            start = None
    return spans


def assert_token_exact(episodes, recorder, n: int, turns: int, version: int) -> None:
    """Every turn: the engine was sent the episode's ids so far and its reply is in the trajectory unchanged; the
    environment segments decode to exactly the template's rendering of the replies; every turn of an episode went
    to one route (server)."""
    assert len(recorder.sent) == turns
    for index, e in enumerate(episodes):
        full, spans = e.prompt_ids + e.ids, turn_spans(e)
        assert len(spans) == turns == e.turns and e.done and not e.truncated, (spans, e.turns, e.truncated, e.error)
        for t, (start, end) in enumerate(spans):
            if t == 0:  # the group's one request, its sample index % n
                sent, returned = recorder.sent[0][e.group], recorder.returned[0][e.group][index % n]
                route = recorder.routes[0][e.group]
            else:
                sent, returned = recorder.sent[t][index], recorder.returned[t][index][0]
                assert recorder.routes[t][index] == route, "an episode's turns went to different servers"
            assert sent == full[:len(e.prompt_ids) + start], f"turn {t}: the engine was sent other ids"
            assert returned == e.ids[start:end] and returned[-1] in STOPS, f"turn {t}: the sampled ids changed"
        for t, ((_, end), (next_start, _)) in enumerate(zip(spans, spans[1:])):
            segment = TOKENIZER.decode(e.ids[end:next_start], skip_special_tokens=False)
            assert segment == f"\n<|im_start|>user\n{REPLIES[t]}<|im_end|>\n<|im_start|>assistant\n"
            assert all(v == -1 for v in e.versions[end:next_start])
            assert all(lp == 0.0 for lp in e.logprobs[end:next_start])
        assert all(v == version for v, s in zip(e.versions, e.sampled) if s)
        assert e.messages[-1]["role"] == "assistant" and e.reward == {"turns": float(turns)}


def test_a_three_turn_episode_trains_exactly_the_tokens_sent_and_returned(hf_engine):
    recorder = Recorder(_force_stop(hf_engine, 6))
    rows = [{"prompt": "What is 2 + 3?"}, {"prompt": "Name a colour."}]
    episodes = _runner().run(recorder, rows, _settings(), routes=[0, 1])
    assert len(recorder.sent[0]) == 2  # turn 1: one request of n samples per prompt (as single-turn GRPO sends)
    assert_token_exact(episodes, recorder, n=2, turns=3, version=0)


def test_single_turn_episodes_are_one_request_of_n_samples_per_prompt(hf_engine):
    from trainer.rl.envs.base import SingleTurnEnv
    from trainer.rl.prompts import make_prompts
    prompts = make_prompts("add", 2, seed=1, tokenizer=TOKENIZER)
    recorder = Recorder(hf_engine)
    episodes = _runner(SingleTurnEnv, max_turns=1).run(recorder, [p.env_row() for p in prompts], _settings(n=3),
                                                        routes=[0, 1])
    assert recorder.sent == [[p.input_ids for p in prompts]]  # what single-turn GRPO always sent
    direct = hf_engine.sample([p.input_ids for p in prompts], _settings(n=3))
    assert [e.ids for e in episodes] == [c.token_ids for group in direct for c in group]  # same seed, same tokens
    assert all(all(e.sampled) and e.turns == 1 for e in episodes)


def test_budgets_truncate_and_mark_episodes(hf_engine):
    engine = _force_stop(hf_engine, 6)
    rows = [{"prompt": "Say hi."}]
    turns = _runner(max_turns=2).run(engine, rows, _settings(n=1), routes=[0])[0]
    assert (turns.turns, turns.truncated) == (2, "max_turns")
    opening = len(EpisodeRenderer(TOKENIZER, STOPS).opening(ThreeTurnEnv().reset(rows[0])))
    tokens = _runner(max_episode_tokens=opening + 14).run(engine, rows, _settings(n=1), routes=[0])[0]
    assert tokens.truncated == "max_episode_tokens" and tokens.length <= opening + 14
    cut = _runner(max_new_tokens=3).run(hf_engine, rows, _settings(n=1, max_new_tokens=3, seed=5), routes=[0])[0]
    if cut.ids[-1] not in STOPS:
        assert (cut.truncated, cut.turns, len(cut.ids)) == ("max_new_tokens", 1, 3)


class Failing(ThreeTurnEnv):
    def step(self, messages, row):
        if "fail" in row["prompt"]:
            raise RuntimeError("the tool server is down")
        return super().step(messages, row)


class Malformed(ThreeTurnEnv):
    def step(self, messages, row):
        return "not a list", False


def test_a_failing_environment_drops_its_episodes_until_the_bound(hf_engine):
    engine = _force_stop(hf_engine, 4)
    rows = [{"prompt": "ok"}, {"prompt": "ok too"}, {"prompt": "ok three"}, {"prompt": "fail", "task": "flaky"}]
    episodes = _runner(Failing).run(engine, rows, _settings(n=1), routes=[0, 1, 2, 3])
    assert [e.error is not None for e in episodes] == [False, False, False, True]
    assert "the tool server is down" in episodes[3].error
    with pytest.raises(RuntimeError, match=r"2 of 2 episodes failed in environment Failing.*'flaky'.*tool server"):
        _runner(Failing).run(engine, [rows[3]], _settings(n=2), routes=[0])
    with pytest.raises(TypeError, match="Malformed.step must return a list of"):
        _runner(Malformed).run(engine, rows[:1], _settings(n=1), routes=[0])


class AsyncEnv(ThreeTurnEnv):
    async def reset(self, row):
        return super().reset(row)

    async def step(self, messages, row):
        return [], True

    async def reward(self, messages, row):
        return 0.5


def test_async_environments_run_like_sync_ones(hf_engine):
    episode = _runner(AsyncEnv).run(_force_stop(hf_engine, 4), [{"prompt": "hi"}], _settings(n=1), routes=[0])[0]
    assert episode.turns == 1 and episode.reward == 0.5 and episode.error is None


QWEN3_LIKE = ("{%- for m in messages %}{%- if m.role == 'assistant' and not loop.last %}"
              "{{- '<|im_start|>assistant\\n' + (m.content.split('</think>')[-1] | trim) + '<|im_end|>\\n' }}"
              "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
              "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_a_template_that_rerenders_earlier_turns_is_refused_with_the_fix():
    check_template(TOKENIZER, STOPS)  # the builtin ChatML template extends conversations exactly
    check_template(TOKENIZER, STOPS, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    other = load_tokenizer("builtin")
    other.chat_template = QWEN3_LIKE  # drops an earlier turn's <think> block once a later turn exists
    with pytest.raises(TemplateError, match="data.chat_template"):
        check_template(other, STOPS)


def test_truncation_policies_mask_or_penalise():
    from trainer.rl.rollouts import overlong_penalty
    assert overlong_penalty(10, most=100, buffer=20) == 0.0
    assert overlong_penalty(90, most=100, buffer=20) == pytest.approx(-0.5)
    assert overlong_penalty(130, most=100, buffer=20) == -1.0


def test_an_environments_tools_reach_the_model_as_sft_renders_them():
    """A tool environment on a template that ignores tools=: the episode's opening carries the tool schemas in the
    system message, exactly as SFT renders a tool-use row (trainer/data/chat.py prepare_chat)."""
    from trainer.data.chat import template_ids
    from trainer.rl.envs.calculator import CalculatorEnv
    env = CalculatorEnv()
    messages = env.reset(CalculatorEnv.make_rows(1, seed=0)[0])
    ids = EpisodeRenderer(TOKENIZER, STOPS, env.tools).opening(messages)
    assert ids == template_ids(TOKENIZER, messages, add_generation_prompt=True, tools=env.tools)
    text = TOKENIZER.decode(ids)
    assert "<tools>" in text and '"name": "calculate"' in text and text.count("<tools>") == 1


def _truncation_worker(rank, world, policy, max_turns):
    """RolloutMaker on the hf engine, guess_number, 8-token turns: most episodes are cut (max_new_tokens)."""
    import torch.distributed as dist

    from tests.test_rl import RL_FAST, compose_rl
    from trainer import config
    from trainer.engine import build_trainer
    from trainer.rl.envs.guess import GuessNumberEnv
    from trainer.rl.prompts import env_prompts
    from trainer.rl.rollout.hf import HFRolloutEngine
    from trainer.rl.rollouts import RolloutMaker
    from trainer.rl.tasks import resolve_batched_reward
    cfg = compose_rl(RL_FAST + ["model.cp=1", "rollout.env=guess_number", "rollout.max_new_tokens=8",
                                f"rollout.max_turns={max_turns}", f"rollout.truncated={policy}",
                                "reward.functions=[format]", "reward.weights=[1.0]"])
    trainer = build_trainer(cfg, validate=config.validate_rl)
    engine = HFRolloutEngine(trainer.model, trainer.tokenizer, trainer.device)
    engine.sync(trainer.model, 0)
    maker = RolloutMaker(cfg, trainer.tokenizer, [resolve_batched_reward("format")])
    rollouts, sums = maker.generate(engine, env_prompts(GuessNumberEnv.make_rows(2, seed=3)), 0)
    maker.close()
    dist.destroy_process_group()
    return [(r.loss_mask, r.reward, r.completion_ids) for r in rollouts], sums["truncated"], sums["n"]


def test_truncated_episodes_train_as_rollout_truncated_says():
    """mask: a truncated episode keeps its reward (its group's advantages) and trains no token; overlong_penalty:
    one-turn episodes lose linearly over the last quarter of their 8-token budget (DAPO's L_max), 1 at 8 tokens."""
    from tests.dist import run_distributed
    kept, truncated, n = run_distributed(_truncation_worker, 1, "keep", 2)[0]
    masked, _, _ = run_distributed(_truncation_worker, 1, "mask", 2)[0]
    assert truncated >= 1 and n == 8
    for (keep_mask, keep_reward, ids), (mask, mask_reward, _) in zip(kept, masked):
        assert mask_reward == keep_reward and any(keep_mask)  # the same seeded episodes
        assert mask == keep_mask or not any(mask)
    assert sum(not any(mask) for mask, _, _ in masked) == truncated
    one_turn, _, _ = run_distributed(_truncation_worker, 1, "keep", 1)[0]
    penalised, _, _ = run_distributed(_truncation_worker, 1, "overlong_penalty", 1)[0]
    for (_, reward, ids), (_, penalty_reward, _) in zip(one_turn, penalised):
        expected = 0.0 if len(ids) <= 6 else (6 - len(ids)) / 2  # L_max 8, buffer 2: 7 tokens -0.5, 8 tokens -1
        assert penalty_reward == pytest.approx(reward + expected)
    assert any(len(ids) == 8 for _, _, ids in one_turn)


def test_retry_and_guess_environments_reply_from_the_answer():
    """The built-in multi-turn environments: retry gives feedback until an attempt is right or attempts run out;
    guess_number answers Higher / Lower and ends on the hidden number."""
    from trainer.rl.envs.guess import GuessNumberEnv
    from trainer.rl.envs.retry import FEEDBACK, RetryEnv
    row = {"prompt": "What is 7 * 8?", "answer": "56", "prompt_messages": [{"role": "user", "content": "7 * 8?"}]}
    env = RetryEnv(attempts=2)
    conversation = env.reset(row) + [{"role": "assistant", "content": "7 * 8 = 54"}]
    assert env.step(conversation, row) == ([{"role": "user", "content": FEEDBACK}], False)
    conversation += [{"role": "user", "content": FEEDBACK}, {"role": "assistant", "content": "The answer is 56."}]
    assert env.step(conversation, row) == ([], True)
    assert env.reward(conversation, row) == {"solved": 1.0, "first_try": 0.0}
    wrong_twice = conversation[:-1] + [{"role": "assistant", "content": "55"}]
    assert env.step(wrong_twice, row) == ([], True) and env.reward(wrong_twice, row)["solved"] == 0.0
    [guess_row] = GuessNumberEnv.make_rows(1, seed=4)
    target, guess = int(guess_row["answer"]), GuessNumberEnv()
    low = guess.reset(guess_row) + [{"role": "assistant", "content": f"<answer>{target - 1}</answer>"}]
    assert guess.step(low, guess_row) == ([{"role": "user", "content": "Higher."}], False)
    right = low + [{"role": "user", "content": "Higher."},
                   {"role": "assistant", "content": f"<answer>{target}</answer>"}]
    assert guess.step(right, guess_row) == ([], True)
    assert guess.reward(right, guess_row)["solved"] == 1.0


def test_a_multi_turn_run_refuses_the_template_at_startup(tmp_path):
    """The loop's startup check (before any episode): data.chat_template set to a template that drops earlier
    <think> blocks, with a multi-turn environment -> refused naming the key; single_turn never needs the check."""
    from tests.test_rl import RL_FAST, compose_rl
    from trainer.rl.loop import check_environment
    from trainer.rl.rollouts import RolloutMaker
    template = tmp_path / "drops_think.jinja"
    template.write_text(QWEN3_LIKE)
    tokenizer = load_tokenizer("builtin")
    tokenizer.chat_template = template.read_text()  # what build_trainer does with data.chat_template
    cfg = compose_rl(RL_FAST + ["rollout.env=guess_number", f"data.chat_template={template}"])
    with pytest.raises(TemplateError, match="data.chat_template"):
        check_environment(RolloutMaker(cfg, tokenizer, []), tokenizer)
    check_environment(RolloutMaker(compose_rl(RL_FAST), tokenizer, []), tokenizer)


class ScriptedTurns:
    """A rollout engine whose turns are given texts (encoded + the end of turn): the tool path without a model
    that has learned to call tools."""

    def __init__(self, texts):
        self.turns = [TOKENIZER(t, add_special_tokens=False)["input_ids"] + [STOPS[0]] for t in texts]
        self.version, self.calls = 0, 0

    def sample(self, prompts, settings, routes=None):
        from trainer.rl.rollout.base import Completion
        ids = self.turns[min(self.calls, len(self.turns) - 1)]
        self.calls += 1
        return [[Completion(list(ids), [-0.5] * len(ids), 0) for _ in range(settings.n)] for _ in prompts]


def _tool_worker(rank, world):
    """calculator through RolloutMaker: a tool call, its result, the answer; metrics as reward_metrics logs them."""
    import torch.distributed as dist

    from tests.test_rl import RL_FAST, compose_rl
    from trainer.rl.envs.calculator import CalculatorEnv, calculate
    from trainer.rl.prompts import env_prompts
    from trainer.rl.rollouts import RolloutMaker, reward_metrics
    cfg = compose_rl(RL_FAST + ["model.cp=1", "rollout.env=calculator", "rollout.max_turns=3", "data.seq_len=1536",
                                "rollout.max_new_tokens=64", "reward.functions=[]", "reward.weights=[]"])
    [row] = CalculatorEnv.make_rows(1, seed=2)
    question = row["prompt"].removeprefix("What is ").rstrip("?")
    engine = ScriptedTurns([f'<tool_call>{{"name": "calculate", "arguments": {{"expression": "{question}"}}}}'
                            "</tool_call>", f"<answer>{calculate(question)}</answer>"])
    maker = RolloutMaker(cfg, TOKENIZER, [])
    rollouts, sums = maker.generate(engine, env_prompts([row]), 0)
    metrics = reward_metrics(sums, rollouts)
    maker.close()
    dist.destroy_process_group()
    return [(r.loss_mask, TOKENIZER.decode([t for t, m in zip(r.completion_ids, r.loss_mask) if not m]))
            for r in rollouts], metrics, row["answer"], calculate(question)


def test_a_tool_episode_runs_through_the_rollout_maker():
    from tests.dist import run_distributed
    episodes, metrics, answer, computed = run_distributed(_tool_worker, 1)[0]
    assert computed == answer and len(episodes) == 4  # group_size episodes of the one prompt
    for mask, environment_text in episodes:
        assert mask.count(False) > 0 and f"<|im_start|>tool\n{answer}<|im_end|>" in environment_text
    assert metrics["turns_mean"] == 2 and metrics["env_tool_calls"] == 4 and metrics["tool_call_success"] == 1.0
    assert metrics["reward_env_correct"] == 1.0 and metrics["reward_env_used_tool"] == 1.0
