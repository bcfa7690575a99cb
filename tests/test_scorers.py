"""POPE and CHAIR scorers reproduce published numbers exactly (through the CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seeright.cli import main
from seeright.eval import chair, pope

DATA = Path(__file__).parent / "data"
LABELS = [str(Path(str(pope.DATA)) / "original_e3e39262" / f"coco_pope_{s}.json") for s in pope.SPLITS]


def run_cli(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_pope_llava_13b_exact_counts_and_mean_f1(capsys):
    out = run_cli(
        capsys, "score", "pope", "--answers", str(DATA / "pope_llava15_13b/llava-v1.5-13b.jsonl"),
        "--labels", *LABELS, "--questions", str(DATA / "pope_llava15_13b/llava_pope_test.jsonl"),
    )
    published = {"random": (2910, 1182, 31, 1379, 318), "popular": (3000, 1182, 59, 1441, 318), "adversarial": (3000, 1182, 117, 1383, 318)}
    for split, (n, tp, fp, tn, fn) in published.items():
        m = out["splits"][split]
        assert (m["n"], m["TP"], m["FP"], m["TN"], m["FN"]) == (n, tp, fp, tn, fn)
    assert [round(out["splits"][s]["f1"], 2) for s in pope.SPLITS] == [87.14, 86.25, 84.46]
    assert round(out["mean"]["f1"], 1) == 85.9


def test_official_parser_rules():
    assert pope.parse_official("No, there is not.") == "no"
    assert pope.parse_official("Yes. No dog though.") == "yes"  # only the first sentence counts
    assert pope.parse_official("There is no dog") == "no"
    assert pope.parse_official("NO") == "yes"  # the official parser is case-sensitive
    assert pope.parse_pai("NO") == "no" and pope.parse_pai("there isn't") == "no"
    assert pope.parse_substring("Yes, no") == "yes"


def test_pope_join_by_id_and_missing_answers(tmp_path):
    questions = pope.builtin_questions("random")
    answers = [{"question_id": q.question_id, "text": "Yes" if q.label == "yes" else "No"} for q in questions]
    label = str(Path(str(pope.DATA)) / "coco_pope_random.json")
    m = pope.score_by_id(answers, [label])["splits"]["random"]
    assert (m["accuracy"], m["yes_ratio"], m["n"]) == (100.0, 50.0, 3000)
    with pytest.raises(ValueError, match="no answer"):
        pope.score_by_id(answers[:-1], [label])


PUBLISHED_CHAIR = {
    "llava-v1.5-7b_coco_chair_long_ans.jsonl": (46.2, 12.9),
    "cca-llava-1.5-7b_coco_chair_long_ans.jsonl": (43.0, 11.5),
    "llava-v1.5-7b_coco_chair_short_ans.jsonl": (21.0, 6.2),
    "cca-llava-1.5-7b_coco_chair_short_ans.jsonl": (18.2, 5.4),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_CHAIR))
def test_chair_reproduces_published_numbers(capsys, name):
    out = run_cli(capsys, "score", "chair", "--captions", str(DATA / "chair_cca" / name))["metrics"]
    chair_s, chair_i = PUBLISHED_CHAIR[name]
    assert out["n"] == 500
    assert abs(out["CHAIR_S"] - chair_s) <= 0.5 and abs(out["CHAIR_I"] - chair_i) <= 0.5


def test_chair_tiny_example_per_caption_lists():
    expected = json.loads((DATA / "chair_tiny_example/outputs.json").read_text())
    scorer = chair.ChairScorer()
    out = scorer.score(chair.read_captions(DATA / "chair_tiny_example/example_inputs.jsonl"), chair.load_ground_truth(variant="pattern"), per_caption=True)
    for ours, ref in zip(out["captions"], expected["sentences"]):
        assert ours["mscoco_generated_words"] == ref["mscoco_generated_words"]
        assert sorted(ours["mscoco_gt_words"]) == sorted(ref["mscoco_gt_words"])
        assert ours["mscoco_hallucinated_words"] == ref["mscoco_hallucinated_words"]
        assert len(ours["words"]) == len(ref["words"])
        assert ours["metrics"] == pytest.approx(ref["metrics"])
    assert out["metrics"]["Recall"] == pytest.approx(100 * expected["overall_metrics"]["Recall"])


def test_chair_synonym_quirks_and_lemmas():
    scorer = chair.ChairScorer()
    assert " motor bike" in scorer.vocabulary  # OPERA's parse keeps the leading space
    objects, nodes, _ = scorer.caption_objects("Two men skiing near hot dogs, a toilet seat and baby elephants.")
    assert nodes == ["person", "skis", "hot dog", "toilet", "elephant"]
    assert chair.image_id_of("COCO_val2014_000000123456.jpg") == 123456


def test_chair_rejects_unknown_image():
    with pytest.raises(ValueError, match="image_id"):
        chair.ChairScorer().score([{"image_id": -5, "caption": "a dog"}], {1: {"dog"}})


def test_pope_loads_lmms_lab_columns_from_a_saved_dataset(tmp_path):
    from datasets import Dataset

    rows = [
        {"question_id": str(i), "question": f"Is there a {o} in the image?", "answer": a, "image_source": f"img{i}",
         "category": c}
        for i, (o, a, c) in enumerate([("dog", "yes", "random"), ("cat", "no", "random"), ("car", "yes", "popular")])
    ]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "pope"))
    loaded = pope.load_hf_dataset(tmp_path / "pope", split="random")
    assert [(q.question_id, q.label, q.split) for q in loaded] == [("0", "yes", "random"), ("1", "no", "random")]
    assert loaded[0].question == "Is there a dog in the image?"


def test_chair_ground_truth_from_coco_annotation_files(tmp_path, capsys):
    instances = {"categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
                 "annotations": [{"image_id": 7, "category_id": 18}, {"image_id": 8, "category_id": 1}]}
    captions = {"annotations": [{"image_id": 7, "caption": "A man walks his dog."}, {"image_id": 8, "caption": "A woman on a bench."}]}
    (tmp_path / "inst.json").write_text(json.dumps(instances))
    (tmp_path / "caps.json").write_text(json.dumps(captions))
    (tmp_path / "pred.jsonl").write_text(
        json.dumps({"image_id": 7, "caption": "A dog and a man with a frisbee."}) + "\n"
        + json.dumps({"image_id": "COCO_val2014_000000000008.jpg", "text": "A person on a bench."}) + "\n"
    )
    out = run_cli(capsys, "score", "chair", "--captions", str(tmp_path / "pred.jsonl"), "--per-caption",
                  "--coco-instances", str(tmp_path / "inst.json"), "--coco-captions", str(tmp_path / "caps.json"))
    first, second = out["captions"]
    assert first["mscoco_gt_words"] == ["dog", "person"] and first["mscoco_hallucinated_words"] == [["frisbee", "frisbee"]]
    assert second["mscoco_gt_words"] == ["bench", "person"] and second["mscoco_hallucinated_words"] == []
    assert out["metrics"]["CHAIR_S"] == 50.0 and out["metrics"]["CHAIR_I"] == 20.0
