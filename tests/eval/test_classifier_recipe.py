import json

from genaccel.eval.feature_extractor import load_feature_extractor
from genaccel.train.classifier import main


def test_recipe_writes_weights_metrics_and_resumes(tmp_path):
    out = tmp_path / "clf"
    common = ["--set", f"out_dir={out}", "--set", "widths=[4,4,4,128]", "--set", "batch_size=8",
              "--set", "eval_per_class=2", "--set", "ckpt_every=2"]
    main([*common, "--set", "steps=2"])
    assert (out / "last.pt").is_file()
    metrics = main([*common, "--set", "steps=3"])
    assert metrics["steps"] == 3
    assert "resumed from" in (out / "train.log").read_text()
    report = json.loads((out / "crop_classifier.json").read_text())
    assert report["metrics"]["heldout_images"] == 32 and len(report["metrics"]["heldout_accuracy_per_class"]) == 16
    assert load_feature_extractor(out / "crop_classifier.safetensors").feature_dim == 128
