"""CONFIG.py: one schema drives YAML keys, flags, defaults, validation and the saved copy."""
import os
import typing

import pytest
import yaml

import CONFIG
import FLAGS
from REPORT import UserError
from SETTINGS import load
from conftest import ROOT, run


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_precedence_defaults_then_yaml_then_flags(tmp_path):
    path = write(tmp_path, "training: {batch_size: 4, learning_rate: 1e-3}\n")
    cfg, _ = load(["--config", path, "--batch-size", "2"])
    assert cfg.training.batch_size == 2             # flag beats YAML
    assert cfg.training.learning_rate == 1e-3       # YAML beats default (and "1e-3" is read as a number)
    assert cfg.training.grad_accum == CONFIG.TrainingCfg().grad_accum  # default where neither speaks


def test_seed_yaml_keys_and_flags_are_accepted(tmp_path):
    path = write(tmp_path, "model: {name: gpt2, dtype: float32}\ntraining: {epochs: 2, batch_size: 3, grad_accum: 4, "
                           "learning_rate: 0.01, max_length: 32}\noutput: {dir: o}\n")
    cfg, _ = load(["--config", path, "--data", "a.txt", "b.jsonl", "--out", "x", "--epochs", "1",
                      "--grad-accum", "16", "--model", "m", "--max-steps", "7", "--resume"])
    assert (cfg.model.name, cfg.data.files, cfg.output.dir, cfg.training.epochs) == ("m", ["a.txt", "b.jsonl"], "x", 1)
    assert (cfg.training.grad_accum, cfg.training.max_steps, cfg.training.resume) == (16, 7, "auto")
    assert cfg.model.dtype == "float32" and cfg.training.max_length == 32


def test_qualified_flags_work_too(tmp_path):
    cfg, _ = load(["--config", write(tmp_path, ""), "--training.batch-size", "5"])
    assert cfg.training.batch_size == 5


def test_unknown_yaml_key_names_it_and_suggests(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'training.batch_sise' - did you mean 'training.batch_size'"):
        load(["--config", write(tmp_path, "training: {batch_sise: 4}\n")])


def test_key_in_wrong_section_says_where_it_belongs(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'learning_rate' - it belongs at 'training.learning_rate'"):
        load(["--config", write(tmp_path, "learning_rate: 0.1\n")])


def test_unknown_flag_suggests_closest():
    with pytest.raises(UserError, match=r"unknown flag --batch-sise - did you mean '--batch-size'"):
        load(["--batch-sise", "3"])


def test_every_bad_value_is_reported_at_once(tmp_path):
    path = write(tmp_path, "training: {batch_size: 0, learning_rate: -1, grad_accum: two}\n")
    with pytest.raises(UserError) as e:
        load(["--config", path])
    msg = str(e.value)
    assert "training.batch_size: must be >= 1, got 0" in msg
    assert "training.learning_rate: must be > 0" in msg
    assert "training.grad_accum: expected an integer, got 'two'" in msg


def test_bad_flag_value_names_the_key():
    with pytest.raises(UserError, match=r"model.dtype: 'fp8' is not one of"):
        load(["--dtype", "fp8"])
    with pytest.raises(UserError, match=r"training.batch_size: must be >= 1"):
        load(["--batch-size", "0"])


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "training:\n  batch_size: 4\n  epochs: [1\n")
    with pytest.raises(UserError, match=r"c.yaml:\d+: YAML does not parse"):
        load(["--config", path])


def test_missing_explicit_config_file_is_an_error(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load(["--config", str(tmp_path / "nope.yaml")])


def test_cli_model_without_from_scratch_means_pretrained(tmp_path):
    path = write(tmp_path, "model: {name: gpt2, from_scratch: true, config_overrides: {n_layer: 2}}\n")
    assert load(["--config", path])[0].model.from_scratch is True
    assert load(["--config", path, "--model", "somedir"])[0].model.from_scratch is False
    assert load(["--config", path, "--model", "llama", "--from-scratch"])[0].model.from_scratch is True


def test_config_overrides_flag_accepts_yaml_or_key_value():
    assert load(["--config-overrides", "{n_layer: 2, n_embd: 64}"])[0].model.config_overrides == {"n_layer": 2, "n_embd": 64}
    assert load(["--config-overrides", "n_layer=2,n_embd=64"])[0].model.config_overrides == {"n_layer": 2, "n_embd": 64}


def test_resolved_config_round_trips(tmp_path):
    cfg, _ = load(["--config", write(tmp_path, ""), "--batch-size", "3", "--data", "x.txt"])
    again, _ = load(["--config", write(tmp_path, FLAGS.dump(cfg, CONFIG.TRAIN_SECTIONS))])
    assert again == cfg
    assert set(yaml.safe_load(FLAGS.dump(cfg, CONFIG.TRAIN_SECTIONS))) == set(CONFIG.TRAIN_SECTIONS)


def test_help_lists_every_flag_with_its_default():
    r = run("TRAIN.py", "--help")
    assert r.returncode == 0
    for sec, f, _ in FLAGS.leaves(CONFIG.Config, CONFIG.TRAIN_SECTIONS):
        assert FLAGS.flag_of(sec, f) in r.stdout
    assert "(default: 8)" in r.stdout  # training.batch_size


def test_unknown_flag_is_one_line_exit_2_no_traceback():
    r = run("TRAIN.py", "--learning-rat", "0.1")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "did you mean '--learning-rate'" in r.stderr


GENERATED = "<!-- generated by python SETTINGS.py --reference: edit CONFIG.py, not this part -->\n"


def test_the_configuration_page_is_the_schema_as_it_is():
    page = open(os.path.join(ROOT, "docs", "configuration.md")).read()
    assert GENERATED in page
    assert page.split(GENERATED, 1)[1] == FLAGS.markdown(CONFIG.Config, CONFIG.SCRIPTS), \
        "docs/configuration.md is out of date: replace its generated part with `python SETTINGS.py --reference`"


def test_the_reference_names_every_setting_with_its_flag():
    reference = FLAGS.markdown(CONFIG.Config, CONFIG.SCRIPTS)
    for sections in CONFIG.SCRIPTS.values():
        for sec, f, _ in FLAGS.leaves(CONFIG.Config, sections):
            assert f"| `{sec}.{f.name}` | `" in reference, f"{sec}.{f.name}"
    assert "| `training.batch_size` | `--batch-size` | `8` |" in reference
    assert "| `lora.enabled` | `--lora / --no-lora` | `false` |" in reference
    assert "| `export.out` | `--out` | `null` |" in reference  # --out is export's own in EXPORT.py


@pytest.mark.parametrize("value, typ, expected", [
    ("1e-3", float, 1e-3), (2, float, 2.0), (3, int, 3), (True, bool, True), ("x", str, "x"), (5, str, "5"),
    ("a.txt", list, ["a.txt"]), (["a", "b"], list, ["a", "b"]), ({"n": 1}, dict, {"n": 1}),
    (None, typing.Optional[int], None), ("sdpa", typing.Literal["sdpa", "eager"], "sdpa"),
])
def test_convert_accepts(value, typ, expected):
    assert FLAGS.convert(value, typ, "k") == expected


@pytest.mark.parametrize("value, typ, message", [
    ("two", int, "expected an integer"), (1.5, int, "expected an integer"), (True, int, "expected an integer"),
    ("yes", bool, "expected true or false"), ("x", float, "expected a number"), (True, float, "expected a number"),
    ([1], list, "expected a list of strings"), ("n=1", dict, "expected a mapping"),
    ("flash", typing.Literal["sdpa", "eager"], "is not one of"), ([], str, "expected a string"),
])
def test_convert_refuses_naming_the_key(value, typ, message):
    with pytest.raises(UserError, match=f"k: .*{message}|k: {message}"):
        FLAGS.convert(value, typ, "k")
