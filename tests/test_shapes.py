"""The procedural shapes world and its POPE / CHAIR benchmarks follow the real protocols."""

from __future__ import annotations

import json
from collections import Counter

from seeright.eval import chair, pope
from seeright.testbed import world as shapes


def test_benchmark_follows_the_pope_protocol(tmp_path):
    counts = shapes.write_benchmark(tmp_path, n_images=120, seed=7)
    gt = {int(k): set(v) for k, v in json.loads((tmp_path / "chair/gt.json").read_text()).items()}
    by_image = {shapes.image_name(i): objs for i, objs in gt.items()}
    for split in pope.SPLITS:
        questions = pope.load_questions(tmp_path / "pope" / f"shapes_pope_{split}.json")
        assert len(questions) == counts[split] and len(questions) % 2 == 0
        labels = Counter(q.label for q in questions)
        assert labels["yes"] == labels["no"]  # 50% yes
        per_image = Counter(q.image for q in questions)
        assert set(per_image.values()) <= {2, 4, 6} and max(per_image.values()) == 6
        for q in questions:
            name = q.question.split(" ")[3]
            assert (name in by_image[q.image]) == (q.label == "yes")
            assert (tmp_path / "images" / q.image).is_file()
    # adversarial negatives are the positives' frequent partners far more often than random ones
    def partner_rate(split):
        qs = pope.load_questions(tmp_path / "pope" / f"shapes_pope_{split}.json")
        pairs = [(qs[i].question.split(" ")[3], qs[i + 1].question.split(" ")[3]) for i in range(0, len(qs), 2)]
        return sum(shapes.PARTNERS[p] == n for p, n in pairs) / len(pairs)
    assert partner_rate("adversarial") > 2 * partner_rate("random")


def test_world_statistics_and_determinism():
    scenes = shapes.generate_scenes(400, seed=3)
    assert all(1 <= len(s.names) <= 6 for s in scenes)
    with_partner = sum(shapes.PARTNERS[s.names[0]] in s.names for s in scenes if len(s.names) > 1)
    assert with_partner / sum(len(s.names) > 1 for s in scenes) > 0.6
    assert [s.objects for s in shapes.generate_scenes(20, seed=3)] == [s.objects for s in scenes[:20]]
    assert shapes.render(scenes[0], 3).tobytes() == shapes.render(scenes[0], 3).tobytes()


def test_captions_score_with_the_world_synonyms():
    scenes = shapes.generate_scenes(50, seed=5)
    scorer = chair.ChairScorer(synonyms=shapes.synonyms_text())
    gt = {s.image_id: set(s.names) for s in scenes}
    perfect = scorer.score([{"image_id": s.image_id, "caption": shapes.caption(s)} for s in scenes], gt)["metrics"]
    assert perfect["CHAIR_I"] == 0 and perfect["Recall"] == 100
    wrong = [{"image_id": s.image_id, "caption": shapes.caption(s) + " There is a red crescent."} for s in scenes]
    hallucinated = scorer.score(wrong, gt)["metrics"]
    assert hallucinated["CHAIR_S"] == 100 * sum("moon" not in s.names for s in scenes) / len(scenes)


def test_the_evaluation_runner_loads_and_scores_the_shapes_benchmarks(tmp_path):
    from seeright.eval import runner
    from seeright.service.engine import Engine, EngineGenerator

    shapes.write_benchmark(tmp_path / "bench", n_images=12, seed=11)
    generator = EngineGenerator(Engine.from_pretrained("tiny-random/llava"))
    pope_spec = runner.BenchmarkSpec("pope", tmp_path / "bench/images", questions=tmp_path / "bench/pope", max_new_tokens=3)
    metrics = runner.run_benchmark(pope_spec, generator, tmp_path / "pope.jsonl", {"vhr": {}}, progress=False)
    assert set(metrics["splits"]) == set(pope.SPLITS)
    assert all(m["n"] == len(pope.load_questions(runner.pope_file(tmp_path / "bench/pope", s))) for s, m in metrics["splits"].items())
    chair_spec = runner.BenchmarkSpec(
        "chair", tmp_path / "bench/images", gt=tmp_path / "bench/chair/gt.json", synonyms=tmp_path / "bench/chair/synonyms.txt",
        chair_prompt="Describe the image.", max_new_tokens=8,
    )
    records = runner.run_items(runner.benchmark_items(chair_spec), generator, tmp_path / "chair.jsonl", {}, 8, progress=False)
    assert len(records) == 12 and records[0]["prompt"] == "Describe the image."
    assert runner.score_records(chair_spec, records)["n"] == 12


def test_chair_paired_gains_are_the_metric_differences_with_intervals(tmp_path):
    from seeright.eval import runner
    from seeright.testbed import results

    shapes.write_benchmark(tmp_path, n_images=30, seed=13)
    spec = results.specs(tmp_path, batch_size=8)["chair"]
    scenes = shapes.generate_scenes(30, seed=13)
    truth = [{"image_id": s.image_id, "text": shapes.caption(s)} for s in scenes]
    noisy = [{"image_id": s.image_id, "text": shapes.caption(s) + (" There is a red crescent." if i % 3 == 0 else "")}
             for i, s in enumerate(scenes)]
    gains = results.chair_paired_gain(results.chair_counts(spec, noisy), results.chair_counts(spec, truth))
    want, base = runner.score_records(spec, noisy), runner.score_records(spec, truth)
    for metric in ("CHAIR_S", "CHAIR_I", "Recall"):
        assert abs(gains[metric]["points"] - (want[metric] - base[metric])) < 0.01
    assert gains["CHAIR_S"]["interval95"] > 0 and gains["Recall"]["interval95"] >= 0
    same = results.chair_paired_gain(results.chair_counts(spec, truth), results.chair_counts(spec, truth))
    assert all(g == {"points": 0.0, "interval95": 0.0} for g in same.values())


def test_tuning_keeps_the_release_value_unless_it_does_not_suit_the_model():
    from seeright.testbed.tune_defaults import choose

    def row(empty=0, pope=(0.0, 1.0), chair_i=(0.0, 1.0)):
        return {"pope": {"empty_answers": empty, "gain_vs_baseline": {"points": pope[0], "interval95": pope[1]}},
                "chair": {"empty_answers": 0, "gain_vs_baseline": {"CHAIR_I": {"points": chair_i[0], "interval95": chair_i[1]}}}}

    results = {"methods": {"baseline": row(), "gift alpha=5.0": row(empty=1), "gift alpha=3.0": row(pope=(-1.0, 2.0)),
                           "gift alpha=2.0": row(pope=(3.0, 1.0)), "vhr alpha=2.0": row(pope=(-5.0, 4.0)),
                           "vhr alpha=1.5": row(chair_i=(5.0, 4.0)), "pai alpha=0.2": row(chair_i=(-3.0, 1.0))}}
    assert choose(results, "gift") == ("gift alpha=3.0", ["gift alpha=5.0: 1 empty answers"])  # the strongest that suits
    assert choose(results, "vhr") == (None, ["vhr alpha=2.0: POPE -5.0 ±4.0", "vhr alpha=1.5: CHAIR_I +5.0 ±4.0"])
    assert choose(results, "pai") == ("pai alpha=0.2", [])
