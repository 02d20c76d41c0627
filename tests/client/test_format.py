"""Formatting as the `ollama` CLI does it: sizes, times, durations, tables, the `show` summary."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tp_ollama.client.format import go_duration, human_bytes, human_time, processor, show_summary, table


def test_formats_match_ollama():
    assert [human_bytes(n) for n in (512, 4_700_000_000, 2_019_393_189, 270_000_000, 91_000_000)] == [
        "512 B", "4.7 GB", "2.0 GB", "270 MB", "91 MB",
    ]  # fmt: skip
    now = datetime(2025, 1, 1, tzinfo=UTC)
    assert human_time(now - timedelta(minutes=2, seconds=5), now) == "2 minutes ago"
    assert human_time(now - timedelta(days=15), now) == "2 weeks ago"
    assert human_time(now + timedelta(minutes=4, seconds=30), now) == "4 minutes from now"
    assert human_time(now + timedelta(days=365 * 290), now) == "Forever"
    assert [go_duration(n) for n in (0, 953_997, 342_546_000, 1_162_761_250, 62_500_000_000)] == [
        "0s", "953.997µs", "342.546ms", "1.16276125s", "1m2.5s",
    ]  # fmt: skip
    assert [processor(100, 0), processor(100, 100), processor(100, 52)] == ["100% CPU", "100% GPU", "48%/52% CPU/GPU"]
    assert table(["NAME", "ID"], [["a:latest", "123"]]) == "NAME        ID\na:latest    123"


def test_show_summary_sections():
    info = {
        "model_info": {"general.architecture": "llama", "general.parameter_count": 134515008,
                       "llama.context_length": 8192, "llama.embedding_length": 576},
        "details": {"quantization_level": "Q4_1"},
        "capabilities": ["completion"],
        "parameters": 'stop                           "<|im_end|>"\ntemperature                    0.3',
        "system": "Be brief.",
        "license": "Apache 2.0\nline 2\nline 3",
    }  # fmt: skip
    text = show_summary(info)
    assert "    architecture        llama\n    parameters          134.52M\n" in text
    assert "    context length      8192\n    embedding length    576\n    quantization        Q4_1\n" in text
    assert "  Capabilities\n    completion\n" in text
    assert '    stop           "<|im_end|>"\n    temperature    0.3\n' in text
    assert "  System\n    Be brief.\n" in text
    assert "  License\n    Apache 2.0\n    line 2\n    ...\n" in text
