"""Exact-value tests of the contracts in common.py (directions, prompts, rewards, JSONL, model resolution).

Run from the repository root:

    python -m pytest tests/ -q                      # the whole suite
    python -m pytest tests/test_contracts.py -q     # this file only
"""
import math
import os
import socket

import numpy as np
import pytest

import common
from runtime import models
from common import (ATTRIBUTES, HELPFULNESS, VERBOSITY, best_of_n, chat_messages, degree_to_vector, directional_reward,
                    rm_text, system_prompt, vector_to_degree, vector_to_weights, weights_to_vector)
from runtime.io import DataError, check_output, read_jsonl, write_jsonl
from runtime.models import resolve_model

PREFIX = ("You are a helpful, respectful, and honest assistant who always responds to the user in a harmless way. "
          "Your response should maximize weighted rating = ")


# ----------------------------------------------------------------------------- system prompt
def test_system_prompt_minus_15_full_text():
    s = system_prompt(-15)
    assert "helpfulness*97 + verbosity*-26" in s
    assert s == PREFIX + "helpfulness*97 + verbosity*-26"


@pytest.mark.parametrize("degree, wh, wv", [
    (45, 71, 71), (-45, 71, -71), (0, 100, 0), (30, 87, 50), (-30, 87, -50), (15, 97, 26), (90, 0, 100),
    (-90, 0, -100),
])
def test_system_prompt_weights(degree, wh, wv):
    assert system_prompt(degree) == PREFIX + f"helpfulness*{wh} + verbosity*{wv}"
    assert vector_to_weights(degree_to_vector(degree)) == (wh, wv)


def test_system_prompt_zero_has_no_negative_zero():
    assert system_prompt(0).endswith("helpfulness*100 + verbosity*0")
    assert system_prompt(-0.0).endswith("helpfulness*100 + verbosity*0")


def test_chat_messages_roles_and_hint():
    msgs = chat_messages("How?", -15)
    assert msgs == [{"role": "system", "content": system_prompt(-15)}, {"role": "user", "content": "How?"}]
    with_hint = chat_messages("How?", 45, "Be brief.")
    assert with_hint[0]["content"] == system_prompt(45) + " Be brief."
    assert with_hint[1] == {"role": "user", "content": "How?"}


# ----------------------------------------------------------------------------- directions
@pytest.mark.parametrize("degree", [-90, -45, -15, 0, 15, 30, 45, 90, 12.5])
def test_degree_to_vector_unit_norm(degree):
    v = degree_to_vector(degree)
    assert math.hypot(*v) == pytest.approx(1.0, abs=1e-12)
    assert vector_to_degree(v) == pytest.approx(degree, abs=1e-9)


def test_degree_to_vector_values():
    assert degree_to_vector(0) == (1.0, 0.0)
    h = math.sqrt(0.5)
    assert degree_to_vector(45) == pytest.approx((h, h), abs=1e-15)
    assert degree_to_vector(-15) == pytest.approx((0.9659258262890683, -0.25881904510252074), abs=1e-15)


@pytest.mark.parametrize("bad", [91, -91, 90.0001, float("nan"), float("inf"), float("-inf"), "45", None, [45]])
def test_degree_to_vector_rejects(bad):
    with pytest.raises(ValueError, match="degree"):
        degree_to_vector(bad)


def test_weights_to_vector():
    assert weights_to_vector(80, -60) == pytest.approx((0.8, -0.6), abs=1e-15)
    assert weights_to_vector(3, 4) == pytest.approx((0.6, 0.8), abs=1e-15)
    assert vector_to_weights(weights_to_vector(71, 71)) == (71, 71)


@pytest.mark.parametrize("wh, wv", [(0, 0), (0.0, -0.0), (float("nan"), 1), (float("inf"), 1)])
def test_weights_to_vector_rejects(wh, wv):
    with pytest.raises(ValueError):
        weights_to_vector(wh, wv)


# ----------------------------------------------------------------------------- attributes and rewards
def test_attributes_order():
    assert ATTRIBUTES == [
        "helpsteer-helpfulness", "helpsteer-correctness", "helpsteer-coherence", "helpsteer-complexity",
        "helpsteer-verbosity", "ultrafeedback-overall_score", "ultrafeedback-instruction_following",
        "ultrafeedback-truthfulness", "ultrafeedback-honesty", "ultrafeedback-helpfulness",
    ]
    assert ATTRIBUTES.index(HELPFULNESS) == 0
    assert ATTRIBUTES.index(VERBOSITY) == 4
    assert common.SCALE == (0.0, 100.0)


def _reward_row(h, v, other=999.0):
    r = np.full(len(ATTRIBUTES), other)  # huge values elsewhere: only helpfulness and verbosity may count
    r[0], r[4] = h, v
    return r


def test_directional_reward_hand_computed():
    r = _reward_row(60, 40)
    assert directional_reward(r, degree_to_vector(0)) == pytest.approx(60.0, abs=1e-12)
    assert directional_reward(r, degree_to_vector(90)) == pytest.approx(40.0, abs=1e-12)
    assert directional_reward(r, degree_to_vector(45)) == pytest.approx(100 / math.sqrt(2), abs=1e-12)
    assert directional_reward(r, degree_to_vector(-45)) == pytest.approx(20 / math.sqrt(2), abs=1e-12)
    assert directional_reward(r, (0.8, -0.6)) == pytest.approx(0.8 * 60 - 0.6 * 40, abs=1e-12)


def test_directional_reward_vectorised():
    R = np.stack([_reward_row(60, 40), _reward_row(10, 90), _reward_row(50, 50)])  # (3, K)
    out = directional_reward(R, (0.6, 0.8))
    assert out.shape == (3,)
    np.testing.assert_allclose(out, [0.6 * 60 + 0.8 * 40, 0.6 * 10 + 0.8 * 90, 0.6 * 50 + 0.8 * 50], atol=1e-12)
    R3 = np.stack([R, R[::-1]])  # (2, 3, K)
    assert directional_reward(R3, (0.6, 0.8)).shape == (2, 3)


def test_directional_reward_custom_names():
    names = [VERBOSITY, "x", HELPFULNESS]
    assert directional_reward([30.0, 1e6, 70.0], (0.6, 0.8), names) == pytest.approx(0.6 * 70 + 0.8 * 30)


def test_best_of_n():
    R = np.stack([_reward_row(60, 40), _reward_row(10, 95), _reward_row(50, 45)])
    assert best_of_n(R, degree_to_vector(0)) == 0    # 60, 10, 50
    assert best_of_n(R, degree_to_vector(90)) == 1   # 40, 95, 45
    assert best_of_n(R, degree_to_vector(45)) == 1   # (100, 105, 95)/√2
    assert best_of_n(R, degree_to_vector(-45)) == 0  # (20, -85, 5)/√2
    assert isinstance(best_of_n(R, degree_to_vector(0)), int)


def test_best_of_n_ties_pick_first():
    R = np.stack([_reward_row(10, 10), _reward_row(50, 50), _reward_row(50, 50)])
    assert best_of_n(R, degree_to_vector(0)) == 1
    R2 = np.stack([_reward_row(50, 50)] * 4)
    assert best_of_n(R2, degree_to_vector(-30)) == 0


def test_best_of_n_empty_or_1d_raises():
    with pytest.raises(ValueError):
        best_of_n(np.zeros((0, len(ATTRIBUTES))), degree_to_vector(0))
    with pytest.raises(ValueError):
        best_of_n(_reward_row(1, 2), degree_to_vector(0))


# ----------------------------------------------------------------------------- JSONL
def test_jsonl_round_trip(tmp_path):
    recs = [{"id": "a", "x": 1.5, "s": "héllo ✓", "l": [1, None, True]}, {"id": "b", "nested": {"k": -2}}]
    path = tmp_path / "sub" / "dir" / "out.jsonl"  # parent folders are created
    write_jsonl(str(path), recs)
    assert read_jsonl(str(path), required=("id",)) == recs
    raw = path.read_bytes()
    assert raw.count(b"\n") == 2 and raw.endswith(b"\n")
    assert "héllo ✓".encode() in raw  # ensure_ascii=False: UTF-8 text, not \u escapes


def test_write_jsonl_leaves_no_temp_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(str(path), [{"a": 1}])
    write_jsonl(str(path), [{"a": 2}])  # replacing an existing file
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]
    assert read_jsonl(str(path)) == [{"a": 2}]


def test_write_jsonl_refuses_nan_and_keeps_old_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(str(path), [{"a": 1}])
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError):
            write_jsonl(str(path), [{"a": 2}, {"a": bad}])
    assert read_jsonl(str(path)) == [{"a": 1}]  # atomic: the old content survives a failed write


def test_write_jsonl_failed_write_leaves_no_temp_file(tmp_path):
    path = tmp_path / "out.jsonl"
    with pytest.raises(ValueError):
        write_jsonl(str(path), [{"a": float("nan")}])
    assert os.listdir(tmp_path) == []


def test_read_jsonl_skips_blank_lines(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n\n   \n{"a": 2}\n')
    assert read_jsonl(str(p)) == [{"a": 1}, {"a": 2}]


def test_read_jsonl_malformed_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2,,}\n{"a": 3}\n')  # physical line 3 (blank line 2 counts)
    with pytest.raises(DataError) as e:
        read_jsonl(str(p))
    assert f"{p}:3:" in str(e.value)
    assert "malformed JSON" in str(e.value)


def test_read_jsonl_missing_field_names_field_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": 1, "prompt": "a"}\n{"id": 2}\n')
    with pytest.raises(DataError) as e:
        read_jsonl(str(p), required=("id", "prompt"))
    assert f"{p}:2:" in str(e.value)
    assert "'prompt'" in str(e.value)


def test_read_jsonl_non_utf8(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(DataError) as e:
        read_jsonl(str(p))
    assert f"{p}:2:" in str(e.value)
    assert "UTF-8" in str(e.value)


def test_read_jsonl_directory_and_missing(tmp_path):
    with pytest.raises(DataError, match="directory"):
        read_jsonl(str(tmp_path))
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("line, kind", [("[1,2]", "list"), ('"s"', "str"), ("3", "int"), ("null", "NoneType")])
def test_read_jsonl_non_object(tmp_path, line, kind):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        read_jsonl(str(p))
    assert f"{p}:2:" in str(e.value) and kind in str(e.value)


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


def test_check_output(tmp_path):
    out = tmp_path / "out.jsonl"
    check_output(str(out), overwrite=False)  # does not exist: fine
    out.write_text("{}\n")
    with pytest.raises(SystemExit, match="exists"):
        check_output(str(out), overwrite=False)
    check_output(str(out), overwrite=True)
    inp = tmp_path / "in.jsonl"
    with pytest.raises(SystemExit, match="also an input"):
        check_output(str(inp), overwrite=True, inputs=[str(inp)])
    # the same file spelled differently is still the input
    with pytest.raises(SystemExit, match="also an input"):
        check_output(str(tmp_path / "sub" / ".." / "in.jsonl"), overwrite=True, inputs=[str(inp)])


# ----------------------------------------------------------------------------- reward-model text
def test_rm_text_chat(tokenizer):
    text = rm_text(tokenizer, "What is 2+2?", "It is 4.")
    assert text.endswith("<|im_end|>")
    assert not text.endswith("\n")
    assert "What is 2+2?" in text and "It is 4." in text
    assert text.index("What is 2+2?") < text.index("It is 4.")
    assert text.endswith("<|im_start|>assistant\nIt is 4.<|im_end|>")
    # no direction in the RM input: the RM rates the answer, not the trade-off
    assert "weighted rating" not in text


def test_rm_text_dpa_exact():
    text = rm_text(None, "P?", "R.", template="dpa")
    assert text == ("[INST] You must read the following conversation carefully and rate the assistant's response "
                    "from score 0-100 in these aspects: helpfulness, correctness, coherence, honesty, complexity, "
                    "verbosity\n\nUser: P?\n\nAssistant: R. [/INST]")


# ----------------------------------------------------------------------------- model resolution
def no_network(*a, **k):
    raise AssertionError("a network connection was attempted")


def test_resolve_model_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)  # fails fast: no connection is even attempted
    with pytest.raises(SystemExit) as e:
        resolve_model("some-owner/some-model-that-is-not-here")
    assert "some-owner/some-model-that-is-not-here" in str(e.value.code)
    assert "HF_HUB_OFFLINE" in str(e.value.code)


@pytest.mark.parametrize("name", ["./does/not/exist", "/nonexistent/model/dir", "plainname", "a/b/c"])
def test_resolve_model_bad_names(name):
    with pytest.raises(SystemExit) as e:
        resolve_model(name)
    assert name in str(e.value.code)


def test_resolve_model_folder_without_config(tmp_path):
    with pytest.raises(SystemExit, match="no config.json"):
        resolve_model(str(tmp_path))


def test_resolve_model_local_folder_and_default(tiny_model_dir, smollm2_dir):
    assert resolve_model(tiny_model_dir) == tiny_model_dir
    if os.path.abspath(models.CACHE_DIR) == os.path.abspath(os.path.dirname(str(smollm2_dir))):
        assert os.path.samefile(resolve_model(models.DEFAULT_MODEL), str(smollm2_dir))


def test_resolve_model_hub_id_online_passes_through(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert resolve_model("owner/name") == "owner/name"  # no network call: resolution is purely syntactic


def test_auto_dtype_never_fp16_and_cpu_bf16_from_public_flags(monkeypatch):
    """No GradScaler exists, so CUDA without bf16 trains in fp32; the CPU check reads /proc/cpuinfo's flags, not a
    private torch function, and agrees with them."""
    monkeypatch.setattr(models.torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert models.setup(0, "cuda")[1] == models.torch.float32
    monkeypatch.setattr(models.torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert models.setup(0, "cuda:0")[1] == models.torch.bfloat16
    flags = open("/proc/cpuinfo").read().split()
    avx512 = models.torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert models.cpu_has_native_bf16() == (avx512 and ("avx512_bf16" in flags or "amx_bf16" in flags))
    # ATEN_CPU_CAPABILITY=avx2 (an AVX2-only CPU reproduced on a bf16 one) runs fp32
    monkeypatch.setattr(models.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not models.cpu_has_native_bf16() and models.setup(0, "cpu")[1] == models.torch.float32
    monkeypatch.undo()
    assert models.setup(0, "cpu")[1] == (models.torch.bfloat16 if models.cpu_has_native_bf16() else models.torch.float32)
    assert "_is_avx512" not in open(models.__file__).read()
