"""Scale-out on Ray Serve (``service/scale_out.py``): two engine replicas of the tiny model on a local,
loopback-only Ray cluster behind one entry point. Answers equal the single-process server's; killing a replica
under load gives only 200s and retryable 503s, the replica comes back, and an evaluation job running through
the kill writes exactly the single-process results file."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
from conftest import QUESTIONS, make_image
from fastapi.testclient import TestClient
from ray import serve

from seeright.eval import pope, runner
from seeright.eval.http_client import HttpGenerator, image_data_url
from seeright.service.api.app import create_app
from seeright.service.engine import Engine, EngineGenerator
from seeright.service.scale_out import REPLICA_HEADER, merged_metrics, serve_replicas
from seeright.service.settings import Settings

pytestmark = pytest.mark.ray
MODEL = "tiny-random/llava"
MIXED = [{}, {"var": {}}, {"vcd": {"seed": 1}}, {"vemask": {}}, {"gift": {}}, {}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _body(i: int, stream: bool = False, max_tokens: int = 8) -> dict:
    image = image_data_url(make_image(i % 4))
    body = {"model": MODEL if i % 5 else f"{MODEL}+pai", "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "interventions": MIXED[i % len(MIXED)],
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                      {"type": "text", "text": QUESTIONS[i % 4]}]}]}
    return body


def _content(response: httpx.Response) -> str:
    if not response.headers["content-type"].startswith("text/event-stream"):
        return response.json()["choices"][0]["message"]["content"]
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
    return "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events if json.loads(e).get("choices"))


def _pope_images(root) -> None:
    for i, name in enumerate(sorted({q.image for q in pope.builtin_questions("random")[:24]})):
        make_image(i).save(root / name)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    images = tmp_path_factory.mktemp("images")
    _pope_images(images)
    settings = Settings(model=MODEL, host="127.0.0.1", port=_free_port(), allowed_image_dir=images,
                        eval_dir=tmp_path_factory.mktemp("evals"), retry_after_s=1)
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2, configure_logging=False)
    try:
        serve_replicas(settings, replicas=2, replica_cpus=1, blocking=False)
        yield settings, httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", timeout=120)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_as_one_process(cluster, engine):
    settings, client = cluster
    bodies = [_body(i, stream=i % 3 == 0) for i in range(12)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: client.post("/v1/chat/completions", json=b), bodies))
    with TestClient(create_app(Settings(model=MODEL), engine)) as local:
        expected = [_content(local.post("/v1/chat/completions", json=b)) for b in bodies]
    assert [r.status_code for r in responses] == [200] * len(bodies)
    assert [_content(r) for r in responses] == expected
    assert len({r.headers[REPLICA_HEADER] for r in responses}) == 2  # both replicas served
    health = client.get("/health").json()
    assert len(health["replicas"]) == 2
    metrics = client.get("/metrics").text
    served = [line for line in metrics.splitlines() if line.startswith('seeright_requests_total{replica="')]
    assert len({line.split('"')[1] for line in served}) == 2
    assert client.post("/v1/chat/completions", json={**bodies[0], "max_tokens": 0}).status_code == 400


def _kill_one_replica() -> str:
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "EngineReplica" in a["name"]]
    victim = replicas[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]))
    return victim["name"]


def test_a_killed_replica_gives_retryable_503s_comes_back_and_loses_no_evaluation_item(cluster, engine, tmp_path):
    settings, client = cluster
    before = {r["replica"] for r in client.get("/health").json()["replicas"]}
    job = {"benchmark": "pope", "split": ["random"], "limit": 24, "prompt": "llava", "interventions": {"vhr": {}},
           "max_new_tokens": 6, "batch_size": 6}
    created = client.post("/v1/evaluations", json=job)
    assert created.status_code == 202, created.text
    statuses: list[httpx.Response] = []

    def load(worker: int) -> None:
        for i in range(6):
            statuses.append(client.post("/v1/chat/completions", json=_body(worker * 6 + i, stream=i % 2 == 0, max_tokens=32)))

    workers = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for w in workers:
        w.start()
    time.sleep(1.5)
    _kill_one_replica()
    for w in workers:
        w.join(timeout=120)
    codes = [r.status_code for r in statuses]
    print("statuses under the kill:", sorted(codes))
    assert len(codes) == 24 and set(codes) <= {200, 503}, codes
    assert all(r.headers.get("retry-after") for r in statuses if r.status_code == 503)

    deadline = time.time() + 120
    while time.time() < deadline:
        view = client.get(f"/v1/evaluations/{created.json()['id']}").json()
        if view["status"] in ("completed", "failed"):
            break
        time.sleep(0.5)
    assert view["status"] == "completed", view
    spec = runner.BenchmarkSpec("pope", settings.allowed_image_dir, ("random",), 24, "llava", max_new_tokens=6, batch_size=6)
    in_process = tmp_path / "in_process.jsonl"
    runner.run_benchmark(spec, EngineGenerator(engine), in_process, {"vhr": {}}, progress=False)
    assert (settings.eval_dir / view["id"] / "pope.jsonl").read_bytes() == in_process.read_bytes()

    after: set[str] = set()
    while time.time() < deadline:  # the dead replica is replaced
        health = client.get("/health")
        after = {r["replica"] for r in health.json()["replicas"]} if health.status_code == 200 else set()
        if len(after) == 2 and after != before:
            break
        time.sleep(1)
    assert len(after) == 2 and after != before
    assert client.post("/v1/chat/completions", json=_body(1)).status_code == 200


def test_metrics_of_replicas_merge_with_a_replica_label():
    a = "# HELP q Depth.\n# TYPE q gauge\nq 1.0\n# HELP r Requests.\n# TYPE r counter\nr_total{status=\"200\"} 3.0\n"
    b = "# HELP q Depth.\n# TYPE q gauge\nq 2.0\n# HELP r Requests.\n# TYPE r counter\nr_total{status=\"200\"} 5.0\n"
    assert merged_metrics([("b", b), ("a", a)]).splitlines() == [
        "# HELP q Depth.", "# TYPE q gauge", 'q{replica="a"} 1.0', 'q{replica="b"} 2.0',
        "# HELP r Requests.", "# TYPE r counter", 'r_total{replica="a",status="200"} 3.0', 'r_total{replica="b",status="200"} 5.0',
    ]


def test_the_evaluation_client_retries_a_503_after_its_retry_after():
    answers = iter([httpx.Response(503, headers={"Retry-After": "0"}, json={}),
                    httpx.Response(200, json={"choices": [{"message": {"content": "yes"}}]})])
    generator = HttpGenerator("http://server", MODEL)
    generator.client = httpx.Client(base_url="http://server", transport=httpx.MockTransport(lambda request: next(answers)))
    assert generator.generate(["Is there a dog?"], [make_image(0)], {}, 4) == ["yes"]
