"""--preset paper is the authors' protocol: resolved settings, the loss normalisation, steps without targets, LoRA as
PEFT configures it, the learning-rate schedule, the external analyzer (a local model or an HTTP endpoint), and the
authors' environment in its details (which rollouts fail, what the policy and the analyzer read), each against their
code's outcome for the same rollout, transcribed by hand."""
import copy
import http.server
import json
import threading
import time
from types import SimpleNamespace as NS

import pytest
import torch

import envs
import eval as ev
import hintsd
import prompts
from conftest import lora_copy

PAPER = {"lora_rank": 32, "lora_alpha": 64.0, "lora_dropout": 0.05, "lora_targets": ["q_proj", "v_proj"],
         "lr": 5e-6, "lr_schedule": "linear", "topk": 100, "max_new_tokens": 1024, "temperature": 0.6,
         "analyzer_temperature": 0.6, "analyzer_top_p": 0.95, "analyzer_tokens": 512, "rollouts": 4,
         "tasks_per_step": 2, "epochs": 15, "max_len": 24576, "max_env_steps": 20, "seed": 42, "ema_rate": 0.999,
         "action_protocol": "authors", "analyzer_prompt": "authors", "analyzer_parser": "strict", "loss_norm": "task",
         "model": "Qwen/Qwen3-4B-Instruct-2507"}


def no_model(*a, **k):
    raise AssertionError("the model was loaded")


def test_print_config_is_the_authors_protocol_and_loads_nothing(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(hintsd, "load_model", no_model)
    hintsd.main(["--preset", "paper", "--print-config", "--device", "cpu", "--out", str(tmp_path / "never")])
    cfg = json.loads(capsys.readouterr().out)
    assert {k: cfg[k] for k in PAPER} == PAPER
    assert set(vars(hintsd.parse_args(["--print-config"]))) <= set(cfg)  # every flag is in it
    assert not (tmp_path / "never").exists()
    hintsd.main(["--preset", "cpu", "--print-config"])
    cpu = json.loads(capsys.readouterr().out)
    assert cpu["topk"] is None and cpu["action_protocol"] == "friendly" and cpu["analyzer_parser"] == "lenient"
    assert cpu["model"] == "embedded"
    assert cpu["lora_targets"] == list(hintsd.LORA_ALL) and cpu["lr_schedule"] == "constant"


def test_task_normalisation_against_a_hand_computation(policy, trajs):
    """The step loss under the authors' normalisation: each task's token mean of KL(student || teacher), averaged
    over the step's tasks, a task without targets counting 0. Here: tasks [0] and [1] of this rank, and a third
    task of the step (on another rank, say) with no target."""
    tok = policy[1]
    model, params = lora_copy(policy[0], 0.2)
    ema = hintsd.Shadow(params)
    for v in ema.values:
        v.mul_(0.5)
    targets = [hintsd.Target(0, 0, "You should call ls."), hintsd.Target(1, 0, "You should cd first."),
               hintsd.Target(1, len(trajs[1].steps) - 1, "You should stop.")]
    sig = hintsd.Signal(targets=targets)
    total = hintsd.token_totals(trajs, [[0], [1]], sig, tok, 1 << 20)
    hintsd.update(model, tok, trajs, [[0], [1]], sig, ema, hintsd.LossConfig(topk=None, norm="task"), 1 << 20, 3, total)
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    t_rows = {0: [], 1: []}
    for tg in targets:  # by hand, with plain forwards: the teacher first (entering the shadow writes the params)
        t, s = trajs[tg.traj], trajs[tg.traj].steps[tg.step]
        fb = prompts.feedback_ids(tok, tg.feedback)
        with torch.no_grad(), ema:
            keep = torch.arange(s.start + len(fb) - 1, s.end + len(fb) - 1)
            ctx = t.tokens[:s.header] + fb + t.tokens[s.header:s.end]
            t_rows[tg.traj].append(model(torch.tensor([ctx]), logits_to_keep=keep).logits[0].float())
    means = []
    for i in (0, 1):  # one token mean per task
        s_rows = []
        for tg in (tg for tg in targets if tg.traj == i):
            s = trajs[i].steps[tg.step]
            keep = torch.arange(s.start - 1, s.end - 1)
            s_rows.append(model(torch.tensor([trajs[i].tokens[:s.end]]), logits_to_keep=keep).logits[0].float())
        means.append(hintsd.reverse_kl_loss(torch.cat(s_rows), torch.cat(t_rows[i])))
    ((means[0] + means[1] + 0.0) / 3).backward()
    assert all(torch.allclose(a, p.grad, rtol=1e-3, atol=1e-7) for a, p in zip(got, params))
    for p in params:  # the pooled token mean is a different loss
        p.grad = None
    hintsd.update(model, tok, trajs, [[0], [1]], sig, ema, hintsd.LossConfig(norm="token"), 1 << 20, 3, total)
    assert not all(torch.allclose(a, p.grad, rtol=1e-3, atol=1e-7) for a, p in zip(got, params))


CLI = ["--preset", "cpu", "--tasks", "multi_turn_base_105", "--rollouts", "2", "--tasks-per-step", "1",
       "--max-new-tokens", "6", "--max-env-steps", "3", "--lora-rank", "4", "--lr", "1e-2", "--temperature", "1.0",
       "--no-after-check", "--ema-rate", "0.5"]


def test_a_step_without_targets_still_steps_the_optimizer_the_schedule_and_the_ema(tiny_qwen, tmp_path,
                                                                                     monkeypatch):
    real, calls = hintsd.select_targets, []

    def first_step_only(*args, **kw):  # step 1 gets the oracle's targets, step 2 none
        h = real(*args, **kw)
        calls.append(len(h.targets))
        return h if len(calls) == 1 else hintsd.Hindsight([], [], 0)
    monkeypatch.setattr(hintsd, "select_targets", first_step_only)
    out = tmp_path / "run"
    hintsd.main(["--model", str(tiny_qwen), "--feedback", "oracle", "--steps", "2", "--lr-schedule", "linear",
                 "--out", str(out), *CLI])
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert calls[0] > 0 and rows[0]["targets"] > 0 and rows[1]["targets"] == 0
    one = torch.load(out / "ckpt-000001" / "state.pt", weights_only=True)
    two = torch.load(out / "ckpt-000002" / "state.pt", weights_only=True)
    assert float(two["opt"]["state"][0]["step"]) == 2 and two["sched"]["last_epoch"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(one["params"], two["params"]))  # Adam's momentum moved them
    assert any(not torch.equal(a, b) for a, b in zip(one["shadows"]["ema"], two["shadows"]["ema"]))
    assert [r["lr"] for r in rows] == [1e-2, 1e-2 * 0.5]  # linear decay to 0 over the 2 steps, no warmup


def test_linear_schedule_decays_to_zero_without_warmup(tiny_qwen, tmp_path):
    out = tmp_path / "run"
    hintsd.main(["--model", str(tiny_qwen), "--feedback", "env", "--steps", "4", "--lr-schedule", "linear",
                 "--out", str(out), *CLI])
    assert [json.loads(x)["lr"] for x in open(out / "metrics.jsonl")] == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3])


def test_lora_as_peft_configures_it(tiny):
    model = copy.deepcopy(tiny).to(torch.bfloat16)
    params = hintsd.trainable_params(model, 8, 16, 0.5, ["q_proj", "v_proj"])
    wrapped = [n for n, m in model.named_modules() if isinstance(m, hintsd.LoRALinear)]
    assert wrapped == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert len(params) == 2 * len(wrapped) and all(p.dtype == torch.float32 for p in params)  # fp32 adapters
    lora = model.model.layers[0].self_attn.q_proj
    bound = lora.base.in_features ** -0.5  # PEFT: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
    assert lora.A.abs().max() <= bound and lora.A.abs().max() > 0.9 * bound and torch.all(lora.B == 0)
    assert abs(float(lora.A.detach().var()) - bound ** 2 / 3) < 0.2 * bound ** 2 / 3
    assert lora.scale == 2.0
    with torch.no_grad():
        lora.B.normal_()
    x = torch.randn(3, lora.base.in_features, dtype=torch.bfloat16)
    model.eval()
    assert torch.equal(lora(x), lora(x))  # no dropout in eval mode
    model.train()
    assert not torch.equal(lora(x), lora(x))  # dropout on the adapter's input in train mode (as PEFT)
    assert lora(x).dtype == torch.bfloat16


class Endpoint(http.server.BaseHTTPRequestHandler):
    """A fake OpenAI-compatible chat-completions server on the loopback address (the test starts it). Its replies,
    the requests it saw and its delay live on the server (`state`), so a late thread of an earlier server cannot
    take a later test's replies."""

    def do_POST(self):
        st = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        st.requests.append((body, self.headers.get("Authorization")))
        time.sleep(st.delay)
        reply = st.replies.pop(0) if st.replies else {"choices": [{"message": {"content": "{}"}}]}
        data = reply.encode() if isinstance(reply, str) else json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    """(url, state): state.replies are answered in order; state.requests collects (body, Authorization)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    server.state = type("State", (), {"replies": [], "requests": [], "delay": 0.0})()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions", server.state
    server.shutdown()


def answer(text):
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


def test_endpoint_answers_and_failures_are_parse_failures_never_errors(endpoint, monkeypatch):
    endpoint, state = endpoint
    monkeypatch.setenv("HINTSD_ANALYZER_KEY", "sk-test")
    chat = [{"role": "user", "content": "hi"}]
    state.replies = [answer("first"), "not json", {"choices": []}, answer(None)]
    assert prompts.ask_endpoint(endpoint, "gpt-x", [chat], 64, 0.6, 0.95, 5, retries=1) == ["first"]
    body, auth = state.requests[0]
    assert body == {"model": "gpt-x", "messages": chat, "max_tokens": 64, "temperature": 0.6, "top_p": 0.95}
    assert auth == "Bearer sk-test"
    assert prompts.ask_endpoint(endpoint, "gpt-x", [chat] * 3, 64, 0.6, 0.95, 5, retries=1) == ["", "", ""]
    state.replies, state.delay = [answer("late")] * 2, 1.5  # slower than the timeout: retried, then ""
    t0 = time.time()
    assert prompts.ask_endpoint(endpoint, "gpt-x", [chat], 64, 0.6, 0.95, 0.5, retries=2) == [""]
    assert time.time() - t0 < 6
    dead = endpoint.replace(endpoint.split(":")[2].split("/")[0], "9")  # port 9: nothing listens
    assert prompts.ask_endpoint(dead, "gpt-x", [chat], 64, 0.6, 0.95, 2, retries=1) == [""]


def test_external_analyzer_endpoint_drives_training(tiny_qwen, tmp_path, endpoint):
    endpoint, state = endpoint
    good = answer('{"failures": [{"step": 1, "feedback": "You should call ls first."}]}')
    state.replies = [good, good, "garbage"]
    out = tmp_path / "run"
    hintsd.main(["--model", str(tiny_qwen), "--feedback", "external", "--analyzer-url", endpoint, "--analyzer-model",
                 "judge-model", "--analyzer-parser", "strict", "--steps", "1", "--out", str(out), *CLI])
    [row] = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert row["targets"] == 2 and row["parse_failures"] == 0 and row["tokens_supervised"] > 0
    assert len(state.requests) == 2 and state.requests[0][0]["model"] == "judge-model"
    assert "Step 1" in state.requests[0][0]["messages"][1]["content"]  # the failed rollout, as the prompt shows
    [rec] = [json.loads(x) for x in open(out / "rollouts.jsonl")]
    assert [r["targets"][0]["feedback"] for r in rec["rollouts"]] == ["You should call ls first."] * 2


def test_dead_endpoint_and_local_external_model_never_stop_training(tiny_qwen, tmp_path):
    out = tmp_path / "dead"
    hintsd.main(["--model", str(tiny_qwen), "--feedback", "external", "--analyzer-url", "http://127.0.0.1:9/v1",
                 "--analyzer-model", "x", "--analyzer-timeout", "1", "--steps", "1", "--out", str(out), *CLI])
    [row] = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert row["targets"] == 0 and row["parse_failures"] == 2  # both failed rollouts: no answer, no target
    out = tmp_path / "local"
    hintsd.main(["--model", str(tiny_qwen), "--feedback", "external", "--analyzer-model", str(tiny_qwen),
                 "--analyzer-tokens", "8", "--steps", "1", "--out", str(out), *CLI])
    [row] = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert row["parse_failures"] + row["targets"] >= 1  # a random model writes garbage: counted, not raised


# -----------------------------------------------------------------------------
# the authors' environment in its details (wgcyeo/HINT-SD: env/service/environments/bfcl/bfcl_env.py and
# env_handler.py, src/train/rollout.py, bfcl_rollout.py, bfcl_feedback.py, appworld_*.py, trainer.py): a rollout,
# what their code gives for it (written out here by hand), ours equal to it

EMPTY_TURN_TASKS = ["multi_turn_base_167", "multi_turn_base_180", "multi_turn_long_context_167",
                    "multi_turn_long_context_180"]  # a ground-truth turn without calls


def bfcl_task(tid):
    return next(t for t in envs.load_tasks("bfcl", "all") if t["id"] == tid)


def results_message(*blocks):
    """Their tool_message_to_qwen_text of a step's results: one user message of <tool_call> blocks."""
    text = "".join("<tool_call>\n" + json.dumps({"name": n, "content": c}, ensure_ascii=False) + "\n</tool_call>\n"
                   for n, c in blocks)
    return [{"role": "user", "content": text}]


def call(name, arguments):
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def test_point1_reward_only_for_a_completed_conversation():
    """Their env computes the reward only at [CONVERSATION_COMPLETED] (bfcl_env.step; rollout.py keeps the last
    step's reward, success = terminated and reward >= 1). The ground truth replayed under a step cap one short of what
    each of 40 train tasks needs loses its last turn-ending step: their rollout stops at the cap, unterminated, 0.
    With the cap it needs: 1 (0 on a task with an empty ground-truth turn, see point 2). The friendly protocol scores
    the short run anyway."""
    short = {"authors": [], "friendly": []}
    for t in envs.load_tasks("bfcl", "train")[:40]:
        actions = envs.make_env(t, protocol="authors").ground_truth_actions()
        for protocol, cap in [("authors", len(actions) - 1), ("friendly", len(actions) - 1), ("authors", len(actions))]:
            env = envs.make_env(t, max_steps=cap, protocol=protocol)
            for text in actions:
                env.step(text)
            if cap < len(actions):
                assert env.done and not env.completed, t["id"]
                short[protocol].append(env.reward())
            else:
                assert env.completed and env.reward() == (0.0 if t["id"] in EMPTY_TURN_TASKS else 1.0), t["id"]
    assert short["authors"] == [0.0] * 40 and sum(short["friendly"]) == 39


def test_point2_empty_ground_truth_turns_as_their_checker_scores_them():
    """Ground truth [..., []]: their _extract_multi_turn_responses drops a user turn without a tool call, so a correct
    replay gives the checker 4 turns of 5 (6 for _180): force_terminated, 0. Any tool call in that turn keeps it,
    even one whose arguments do not decode (the checker skips it, the turn stays): 5 of 5, and the checker skips an
    empty turn's checks, so 1. The friendly protocol keeps the empty turn: 1."""
    fillers = {"none": None, "read": call("list_all_airports", {}), "bad keys": call("list_all_airports", {"a b": 1})}
    for tid in EMPTY_TURN_TASKS:
        task = bfcl_task(tid)
        for protocol, filler, want in [("authors", "none", 0.0), ("friendly", "none", 1.0),
                                       ("authors", "read", 1.0), ("authors", "bad keys", 1.0)]:
            env = envs.make_env(task, protocol=protocol)
            for turn in range(len(task["turns"])):
                calls = env.ground_truth_calls(turn)
                text = envs.format_calls(calls, "json") if calls else fillers[filler]
                if text:
                    env.step(text)
                env.step("Done.")
            assert env.completed and env.reward() == want, (tid, protocol, filler)


LS_0 = {"current_directory_content": ["document", "archive"]}  # ls() in multi_turn_base_0's workspace


def test_point3_malformed_arguments_run_and_keep_the_turn_open():
    """_convert_tool_calls_to_execution_format: "arguments" that are not an object, or a string that is not JSON,
    run name(); a JSON string of an object is that object; keys that are not identifiers make a string eval cannot
    compile, whose SyntaxError is the result. Each is a tool result and the turn stays open. Their checker gets
    name(...) (the decodable ones) for that turn."""
    env = envs.make_env(bfcl_task("multi_turn_base_0"), protocol="authors")
    assert env.step(call("ls", "a=True")) == results_message(("ls_1", LS_0))
    assert env.step(call("ls", [True])) == results_message(("ls_1", LS_0))
    assert env.step(call("ls", '{"a": true}')) == results_message(("ls_1", LS_0))
    assert env.step(call("ls", {"a=1),x(": 1}) + call("ls", {"class": 1})) == results_message(
        ("ls_1", "Error during execution: invalid syntax (<string>, line 1)"),
        ("ls_2", "Error during execution: invalid syntax (<string>, line 1)"))
    assert env.turn == 0 and not env.done and env.calls == [[["ls()"], ["ls()"], ["ls(a=True)"], []]]
    friendly = envs.make_env(bfcl_task("multi_turn_base_0"))
    [out] = friendly.step(call("ls", "a=True"))
    assert out["role"] == "tool" and out["content"].startswith("Error: could not parse") and friendly.calls == [[]]


AIRPORTS = ["RMS", "SBK", "MPC", "SVP", "SHD", "CDG", "LHR", "SSV", "OKD", "WLB", "PEK", "HND", "HKG", "CIA", "CRH",
            "ATV", "PHV", "GFD", "SFO", "LAX", "JFK", "ORD", "BOS"]  # list_all_airports() in multi_turn_base_158


def test_point4_results_that_are_not_dicts_read_as_python_str():
    """bfcl's executor: a str as is, a dict json.dumps'd, anything else str(); their tool message then keeps a
    content that does not parse as JSON as a string: "['RMS', 'SBK', ...]". Friendly: JSON."""
    env = envs.make_env(bfcl_task("multi_turn_base_158"), protocol="authors")
    assert env.step(call("list_all_airports", {})) == results_message(("list_all_airports_1", str(AIRPORTS)))
    assert envs.authors_result(None) == "None" and envs.authors_result({"a": "é"}) == '{"a": "\\u00e9"}'
    friendly = envs.make_env(bfcl_task("multi_turn_base_158"))
    assert friendly.step(call("list_all_airports", {})) == [{"role": "tool", "content": json.dumps(AIRPORTS)}]


def test_point5_error_text_is_the_backends_exception():
    """"Error during execution: " + str(exception), as eval raised it on their string; the checker replays those
    calls to the same error. Only ARG_LIMITS (a hang of the backend) stays ours, and that call is kept from the
    checker."""
    env = envs.make_env(bfcl_task("multi_turn_base_0"), protocol="authors")
    assert env.step(call("cd", {}) + call("cd", {"path": "x"}) + call("nope", {"a": 1})) == results_message(
        ("cd_1", "Error during execution: GorillaFileSystem.cd() missing 1 required positional argument: 'folder'"),
        ("cd_2", "Error during execution: GorillaFileSystem.cd() got an unexpected keyword argument 'path'"),
        ("nope_3", "Error during execution: name 'nope' is not defined"))
    assert env.step(call("run", {}) + call("ls", {"a": float("nan")})) == results_message(
        ("run_1", "Error during execution: Function call run is not allowed."),
        ("ls_2", "Error during execution: name 'nan' is not defined"))
    assert env.calls == [[["cd()", "cd(path='x')", "nope(a=1)"], ["run()", "ls(a='nan')"]]]  # as bfcl decodes them
    math = next(t for t in envs.load_tasks("bfcl", "train") if "MathAPI" in t["involved_classes"])
    env = envs.make_env(math, protocol="authors")
    assert env.step(call("power", {"base": 10, "exponent": 10**9})) == results_message(
        ("power_1", "Error during execution: argument 'exponent' of power must be at most 1000 in magnitude."))
    assert env.calls == [[[]]]
    friendly = envs.make_env(bfcl_task("multi_turn_base_0"))
    assert friendly.step(call("cd", {}))[0]["content"] == "Error: bad arguments for cd: missing a required argument: " \
                                                          "'folder'"


def steps_of(env, texts):
    """Play texts; (initial messages, [hintsd.Step]) as a rollout records them (token positions left at 0)."""
    msgs, steps = env.reset(), []
    for text in texts:
        turn = env.turn
        steps.append(hintsd.Step(turn, 0, 0, 0, text, [], env.step(text)))
    return msgs, steps


def trajectory(env, texts, **kw):
    msgs, steps = steps_of(env, texts)
    for s in steps:
        msgs = msgs + [{"role": "assistant", "content": s.text}] + s.output
    return hintsd.Trajectory(env.task["id"], env.task["category"], msgs, steps=steps, **kw)


def test_point6_a_turn_ending_step_at_the_cap_reads_the_next_query():
    """Their env does not know the cap: a step without a call returns the next user query; the rollout loop then
    stops. The analyzer sees it as that step's output and as the last environment feedback (summarize_bfcl_feedback
    of the last step's state)."""
    task = bfcl_task("multi_turn_base_0")
    env = envs.make_env(task, max_steps=2, protocol="authors")
    t = trajectory(env, [env.ground_truth_action(0), "Done."], status="max_steps")
    nxt = task["turns"][1][0]["content"]
    assert t.steps[-1].output == [{"role": "user", "content": nxt}] and env.done and env.turn == 1
    assert env.reward() == 0.0
    view = prompts.render_episode(t)
    assert view.endswith(f"Step 2\nAssistant action:\nDone.\nEnvironment output:\nUSER:\n{nxt}\nStep reward: 0.0\n"
                         f"Terminated: False\n\nLast environment feedback:\n{nxt}")


OVERFLOW_STEP = """Step 3
Assistant action:

Environment output:
USER:
Rollout stopped before generation because the BFCL conversation exceeded the prompt token budget (23600 > 23552).
Step reward: 0.0
Terminated: False
Info: {"context_exceeded": true, "max_prompt_tokens": 23552, "prompt_tokens": 23600}"""


def test_point7_context_overflow_pseudo_step_for_the_analyzer(monkeypatch):
    """_build_context_exceeded_step: an empty action, the reason as a user message, reward 0, not terminated, its
    info; render_episode_for_detection shows it as the last step, summarize_bfcl_feedback gives no last feedback.
    Their parser counts it (len(episode.steps)); a pick of it has no tokens, so no target. Ours: the same view; the
    training tokens never hold it."""
    env = envs.make_env(bfcl_task("multi_turn_base_0"), protocol="authors")
    t = trajectory(env, [env.ground_truth_action(0), "Done."], status="overflow", overflow=[23600, 23552])
    view = prompts.render_episode(t)
    assert view.endswith("\n\n" + OVERFLOW_STEP) and "Last environment feedback" not in view
    assert prompts.view_steps(t) == 3 and prompts.view_steps(t, "compact") == 2
    assert "Rollout stopped" not in prompts.analyzer_messages(t, style="compact")[1]["content"]
    answers = iter(['{"failures": [{"step": 1, "feedback": "a"}, {"step": 3, "feedback": "b"}]}',
                    '{"failures": [{"step": 3, "feedback": "b"}]}'])
    monkeypatch.setattr(hintsd, "generate_texts", lambda *a, **k: [next(answers)])
    for want in ([hintsd.Target(0, 0, "a")], []):
        h = hintsd.select_targets(None, None, [t], hintsd.AnalyzerConfig(), "multi", "bfcl", {}, {}, "json",
                                  "authors", 0)
        assert h.targets == want and h.parse_failures == 0


def test_point7_rollout_records_the_overflow(policy):
    """What the pseudo-step reads: the prompt that was not sent, in tokens, against max_len - max_new_tokens."""
    model, tok = policy
    task = envs.load_tasks("bfcl", "train")[0]
    first = len(prompts.prompt_ids(tok, envs.make_env(task, protocol="authors").reset(), [])[0])
    for max_len, steps in ((first + 4 + 8, 1), (first + 3, 0)):
        cfg = hintsd.SamplingConfig(max_new_tokens=4, temperature=1.0, max_len=max_len, cuda_graphs=False)
        [t] = hintsd.rollout(model, tok, [envs.make_env(task, protocol="authors")], cfg, [0])
        assert t.status == "overflow" and len(t.steps) == steps and t.overflow[1] == max_len - 4
        assert t.overflow[0] > max_len - 4 and t.overflow[0] >= len(t.tokens)
        assert f"Step {steps + 1}\nAssistant action:\n\n" in prompts.render_episode(t)


def test_point8_analyzer_prompt_keeps_its_first_max_len_minus_tokens_ids(policy, monkeypatch):
    """_sample_teacher_model_texts: the templated prompt truncated to max_model_len - max_new_tokens tokens, on the
    tokenizer's side, "right" for Qwen: the prompt's end goes. 24,576 - 512 = 24,064 under --preset paper."""
    model, tok = policy
    seen = []
    monkeypatch.setattr(hintsd, "generate", lambda m, t, ids, *a, **k: seen.extend(ids) or [NS(tokens=[])] * len(ids))
    long_chat, short_chat = [{"role": "user", "content": "step " * 400}], [{"role": "user", "content": "hi"}]
    full = prompts.prompt_ids(tok, long_chat, None)[0]
    assert len(full) > 300
    hintsd.generate_texts(model, tok, [long_chat, short_chat], 50, max_len=300)
    assert seen == [full[:250], prompts.prompt_ids(tok, short_chat, None)[0]]
    seen.clear()
    hintsd.generate_texts(model, tok, [long_chat], 50)
    assert seen == [full]
    analyzer = hintsd.step_config(hintsd.parse_args(["--preset", "paper", "--print-config"])).analyzer
    assert analyzer.max_len - analyzer.tokens == 24_064


APPWORLD_REPLY = "Let me look first.\n```python\nx = 1\n```\nthen\n```Python\nprint(x)\n```\nDone."


def test_point9_appworld_view_roles_and_refenced_action():
    """appworld_rollout: the step's action is build_appworld_action's (the last ```python block, any case, stripped
    and fenced again), the outputs _stringify_message'd (a tool message reads USER)."""
    t = hintsd.Trajectory("t_1", "appworld", [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
                          steps=[hintsd.Step(0, 0, 0, 0, APPWORLD_REPLY, [], [{"role": "tool", "content": "1\n"}])],
                          status="max_steps")
    assert prompts.render_episode(t, bench="appworld").endswith(
        "Attempt trajectory:\nStep 1\nAssistant action:\n```python\nprint(x)\n```\nEnvironment output:\nUSER:\n1\n"
        "Step reward: 0.0\nTerminated: False\n\nLast environment feedback:\n1")
    assert prompts.appworld_action("```\nprint(2)\n```") == "```python\nprint(2)\n```"  # one fence of another kind
    assert prompts.appworld_action(" print(3) ") == "print(3)" and prompts.appworld_action("```python\nx") == \
        "```python\nx"


def test_point10_the_model_comes_with_the_preset(tmp_path):
    """--preset paper: the authors' Qwen/Qwen3-4B-Instruct-2507; --preset cpu: the embedded 0.5B; --model wins. The
    same in eval.py, which shares the presets."""
    for argv, want in ((["--preset", "paper"], hintsd.PAPER_MODEL), (["--preset", "cpu"], "embedded"),
                       (["--preset", "paper", "--model", "embedded"], "embedded")):
        assert hintsd.parse_args([*argv, "--print-config"]).model == want
        _, args = ev.parse_args([*argv, "--device", "cpu", "--out", str(tmp_path / "e")])
        assert args.model == want
    assert hintsd.PAPER_MODEL == "Qwen/Qwen3-4B-Instruct-2507"


def test_point11_nan_and_infinite_step_numbers_are_dropped():
    """Their parse_multi_step_failure_json calls int() on the step: NaN raises ValueError, Infinity OverflowError,
    and the training step stops. Kept different on purpose: the entry is dropped, the others count."""
    text = '{"failures": [{"step": NaN, "feedback": "a"}, {"step": Infinity, "feedback": "b"}, ' \
           '{"step": 2, "feedback": "c"}]}'
    assert prompts.parse_strict(text, 3) == [(1, "c")] and prompts.parse_analysis(text, 3) == [(1, "c")]


def test_the_analyzers_authors_view_lists_the_tools_the_policy_saw():
    """Friendly protocol: the tools reach the policy through the chat template, not its system message, so the
    authors' view lists them after the system prompt (an analyzer that never sees the tools cannot name the right
    one). Authors' protocol: their system prompt holds the list, and the view is unchanged (no second listing)."""
    task = bfcl_task("multi_turn_base_0")
    friendly = envs.make_env(task, max_steps=2, protocol="friendly")
    t = trajectory(friendly, ["ls()"], tools=friendly.tools)
    view = prompts.render_episode(t)
    head = view[view.index("Initial task prompt:"):view.index("Attempt trajectory:")]
    assert "Tools:\n" in head and len(friendly.tools) > 5
    assert all(json.dumps(x, ensure_ascii=False, separators=(",", ":")) in head for x in friendly.tools)
    assert head.index("SYSTEM:") < head.index("Tools:") < head.index("USER:")
    authors = envs.make_env(task, max_steps=2, protocol="authors")
    ta = trajectory(authors, ["ls()"], tools=authors.tools)
    assert authors.tools == [] and "Tools:\n" not in prompts.render_episode(ta)
    # a trajectory file round-trips them (tests/test_e2e.py checks that a rollout records them)
    model_free = hintsd.Trajectory.from_json(json.loads(json.dumps(t.to_json())))
    assert model_free.tools == friendly.tools and prompts.render_episode(model_free) == view
