"""--preset paper is the authors' protocol: resolved settings, the loss normalisation, steps without targets, LoRA as
PEFT configures it, the learning-rate schedule, and the external analyzer (a local model or an HTTP endpoint)."""
import copy
import http.server
import json
import threading
import time

import pytest
import torch

import hintsd
import prompts
from conftest import lora_copy

PAPER = {"lora_rank": 32, "lora_alpha": 64.0, "lora_dropout": 0.05, "lora_targets": ["q_proj", "v_proj"],
         "lr": 5e-6, "lr_schedule": "linear", "topk": 100, "max_new_tokens": 1024, "temperature": 0.6,
         "analyzer_temperature": 0.6, "analyzer_top_p": 0.95, "analyzer_tokens": 512, "rollouts": 4,
         "tasks_per_step": 2, "epochs": 15, "max_len": 24576, "max_env_steps": 20, "seed": 42, "ema_rate": 0.999,
         "action_protocol": "authors", "analyzer_prompt": "authors", "analyzer_parser": "strict", "loss_norm": "task"}


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
