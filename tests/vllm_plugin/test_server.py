"""The plugin inside vLLM's OpenAI-compatible server, driven over HTTP as users drive it.

Two servers on 127.0.0.1, one after the other (each stopped by its fixture): vLLM without speculation,
whose greedy texts are the reference, and vLLM with DDTREE_VLLM_TREE=ddtree. Against the second:
concurrent streamed and non-streamed completions, clients that hang up mid-stream, and requests the
plugin refuses; the server must give the reference texts, answer each refused request with a 4xx
naming the option, and keep serving.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm.v1")  # the real vLLM (a namespace "vllm" would not have it)
requests = pytest.importorskip("requests")

from ddtree import demo  # noqa: E402

TARGET, DRAFTER = (str(p) for p in demo.pretrained_pair())
PROMPTS = ["def main(", "import os\nimport sys\n", "class Foo:\n    def __init__(self", "for i in range(",
           "while True:\n    ", "x = [", "return self.", "if __name__ == "]
MAX_TOKENS = 40
START_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m vllm.entrypoints.openai.api_server`` in its own process group, on 127.0.0.1."""

    def __init__(self, log_path, tree: str | None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DDTREE_VLLM")}
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", TARGET,
                "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--max-model-len", "512",
                "--enforce-eager", "--max-num-seqs", "8", "--kv-cache-memory-bytes", str(64 << 20), "--seed", "0",
                "--no-async-scheduling"]
        if tree is not None:
            env["DDTREE_VLLM_TREE"] = tree
            args += ["--speculative-config",
                     json.dumps({"method": "dflash", "model": DRAFTER, "num_speculative_tokens": 16})]
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"the server exited with {self.proc.returncode} before serving:\n{self.tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the server did not come up in {START_TIMEOUT_S} s:\n{self.tail()}")
            time.sleep(1)

    def tail(self, n: int = 4000) -> str:
        self.log.flush()
        return open(self.log_path).read()[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.log.close()

    def complete(self, prompt: str, **params) -> requests.Response:
        body = {"model": TARGET, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
                "ignore_eos": True, **params}
        return requests.post(self.url + "/v1/completions", json=body, timeout=300)

    def text(self, prompt: str) -> str:
        r = self.complete(prompt)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    def streamed_text(self, prompt: str) -> str:
        """A streamed completion, read to its end over server-sent events."""
        body = {"model": TARGET, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
                "ignore_eos": True, "stream": True}
        parts = []
        with requests.post(self.url + "/v1/completions", json=body, stream=True, timeout=300) as r:
            assert r.status_code == 200, r.text
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                parts.append(json.loads(line[len(b"data: "):])["choices"][0]["text"])
        return "".join(parts)

    def hang_up(self, prompt: str) -> None:
        """A streamed completion whose client closes the connection after its first event."""
        body = {"model": TARGET, "prompt": prompt, "max_tokens": 200, "temperature": 0.0, "ignore_eos": True,
                "stream": True}
        with requests.post(self.url + "/v1/completions", json=body, stream=True, timeout=300) as r:
            assert r.status_code == 200, r.text
            next(r.iter_lines())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Greedy texts of vLLM without speculation."""
    server = Server(tmp_path_factory.mktemp("plain") / "server.log", None)
    try:
        return {p: server.text(p) for p in PROMPTS}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, reference):
    s = Server(tmp_path_factory.mktemp("ddtree") / "server.log", "ddtree")
    yield s
    s.stop()


def test_concurrent_completions_equal_the_plain_server(server, reference):
    # Streamed and non-streamed requests at once, more than the server's 8 sequences.
    jobs = [(p, stream) for p in PROMPTS for stream in (False, True)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(lambda j: server.streamed_text(j[0]) if j[1] else server.text(j[0]), jobs))
    for (p, stream), text in zip(jobs, texts):
        assert text == reference[p], f"prompt {p!r}, stream={stream}"


def test_the_server_speculates_with_trees(server, reference):
    assert "ddtree.vllm: DFlash drafts become ddtree trees of depth 7: a fixed budget of 16 nodes" in server.tail(10**7)
    server.text(PROMPTS[0])
    metrics = requests.get(server.url + "/metrics", timeout=30).text
    accepted = [float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("vllm:spec_decode_num_accepted_tokens_total")]
    assert accepted and sum(accepted) > 0, "no draft token was accepted: the tree verifier did not run"


def test_clients_that_hang_up_mid_stream(server, reference):
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(server.hang_up, PROMPTS[:4]))
    # The aborted requests are gone and the server carries on with the same answers.
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(server.text, PROMPTS[4:]))
    assert texts == [reference[p] for p in PROMPTS[4:]]


@pytest.mark.parametrize("option, value", [("presence_penalty", 0.5), ("frequency_penalty", 0.3),
                                           ("repetition_penalty", 1.2), ("min_p", 0.1), ("logprobs", 2),
                                           ("min_tokens", 3), ("logit_bias", {"5": 2.0})])
def test_refused_requests_get_a_4xx_naming_the_option(server, reference, option, value):
    # Sampling: a greedy request's min_p is void (vLLM drops it), so the server rightly serves that one.
    r = server.complete(PROMPTS[0], temperature=0.8, **{option: value})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert option in r.text and "tree verification" in r.text, r.text
    assert server.text(PROMPTS[1]) == reference[PROMPTS[1]]  # and it keeps serving
