"""``bench t2i``: its prompts and option precedence (the benchmark itself runs for minutes: docs/benchmarks.md)."""

import pytest

from genaccel.bench import t2i


def test_prompts_are_one_heldout_wording_per_photo_in_class_order():
    from genaccel.data.skimage_crops import PHOTO_NAMES
    from genaccel.train.gpt_t2i import PHOTO_TEXT, TRAIN_TEMPLATES, captions

    prompts = t2i.heldout_prompts(0)
    assert len(prompts) == len(PHOTO_NAMES) and prompts[3] == f"a picture showing {PHOTO_TEXT[PHOTO_NAMES[3]][0]}"
    assert not set(prompts) & set(captions(TRAIN_TEMPLATES))  # never a training string
    with pytest.raises(SystemExit, match="--template"):
        t2i.heldout_prompts(5)


def test_family_defaults_apply_unless_a_flag_or_set_names_the_option():
    a = t2i.parse_args(["--samplers", "ar,sjd", "--set", "sjd.top_k=50"])
    opts = t2i.run_options(a, {"ar": "ar", "sjd": "sjd"})
    assert opts["ar"]["cfg_scale"] == 7.5 and opts["ar"]["top_k"] == 1000 and opts["sjd"]["top_k"] == 50
    a = t2i.parse_args(["--samplers", "ar", "--cfg-scale", "3"])
    assert t2i.run_options(a, {"ar": "ar"})["ar"]["cfg_scale"] == 3.0
