"""Numbers, times and tables as the `ollama` CLI prints them (its `format` package), the `show` summary
and the `--verbose` timing block. Pure functions of their arguments: no command line, no HTTP."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any


def human_bytes(n: int) -> str:
    """4.7 GB, 270 MB, 12 KB, 512 B (powers of 1000)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            value = n / scale
            return f"{int(value)} {unit}" if value >= 10 or value.is_integer() else f"{value:.1f} {unit}"
    return f"{n} B"


def human_duration(seconds: float) -> str:
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s < 60:
        return "1 second" if s == 1 else f"{s} seconds"
    minutes = s // 60
    if minutes < 60:
        return "About a minute" if minutes == 1 else f"{minutes} minutes"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600 / 24 / 365)} years"


def parse_time(text: str | None) -> datetime | None:
    """RFC 3339 with up to nanoseconds ("...29.110811123Z") -> an aware datetime; None when absent."""
    if not text or text.startswith("0001-01-01"):
        return None
    text = re.sub(r"(\.\d{6})\d+", r"\1", text.replace("Z", "+00:00"))
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def human_time(when: datetime | None, now: datetime, never: str = "Never") -> str:
    """ "2 minutes ago", "4 minutes from now", "Forever" (more than 20 years ahead)."""
    if when is None:
        return never
    delta = (now - when).total_seconds()
    if delta < -20 * 365 * 24 * 3600:
        return "Forever"
    if delta < 0:
        return human_duration(-delta) + " from now"
    return human_duration(delta) + " ago"


def go_duration(ns: int) -> str:
    """Go's time.Duration.String(): 1.234567s, 342.546ms, 953.997µs, 1m2.5s."""
    if ns == 0:
        return "0s"
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    if ns < 1000:
        return f"{sign}{ns}ns"

    def decimal(whole: int, frac: int, digits: int) -> str:
        tail = str(frac).rjust(digits, "0").rstrip("0")
        return f"{whole}.{tail}" if tail else str(whole)

    if ns < 10**6:
        return f"{sign}{decimal(ns // 1000, ns % 1000, 3)}µs"
    if ns < 10**9:
        return f"{sign}{decimal(ns // 10**6, ns % 10**6, 6)}ms"
    hours, rest = divmod(ns, 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    seconds = decimal(rest // 10**9, rest % 10**9, 9) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}"
    return f"{sign}{minutes}m{seconds}" if minutes else f"{sign}{seconds}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, no borders, as `ollama list` prints them."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "    ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    ]
    return "\n".join(lines)


def processor(size: int, size_vram: int) -> str:
    if size_vram == 0:
        return "100% CPU"
    if size_vram == size:
        return "100% GPU"
    if size_vram > size or size == 0:
        return "Unknown"
    cpu = round((size - size_vram) / size * 100)
    return f"{cpu}%/{100 - cpu}% CPU/GPU"


def stats(final: dict[str, Any]) -> str:
    """The `--verbose` summary of a final chunk's metrics."""

    def rate(count: int, ns: int) -> str:
        return f"{count / (ns / 1e9):.2f} tokens/s" if ns else "n/a"

    pc, pd = int(final.get("prompt_eval_count", 0)), int(final.get("prompt_eval_duration", 0))
    ec, ed = int(final.get("eval_count", 0)), int(final.get("eval_duration", 0))
    lines = [
        f"total duration:       {go_duration(int(final.get('total_duration', 0)))}",
        f"load duration:        {go_duration(int(final.get('load_duration', 0)))}",
        f"prompt eval count:    {pc} token(s)",
        f"prompt eval duration: {go_duration(pd)}",
        f"prompt eval rate:     {rate(pc, pd)}",
        f"eval count:           {ec} token(s)",
        f"eval duration:        {go_duration(ed)}",
        f"eval rate:            {rate(ec, ed)}",
    ]
    return "\n".join(lines)


def show_summary(info: dict[str, Any], verbose: bool = False) -> str:
    """`ollama show MODEL`: the Model, Capabilities, Parameters, System and License sections."""
    model_info: dict[str, Any] = info.get("model_info") or {}
    details: dict[str, Any] = info.get("details") or {}
    arch = str(model_info.get("general.architecture") or details.get("family") or "")
    count = model_info.get("general.parameter_count")
    params = _human_number(int(count)) if isinstance(count, int | float) and count else details.get("parameter_size")
    rows = [
        ("architecture", arch),
        ("parameters", params),
        ("context length", model_info.get(f"{arch}.context_length") or details.get("context_length")),
        ("embedding length", model_info.get(f"{arch}.embedding_length") or details.get("embedding_length")),
        ("quantization", details.get("quantization_level")),
    ]
    sections = [("Model", [(k, str(v)) for k, v in rows if v not in (None, "")])]
    sections.append(("Capabilities", [(c, "") for c in info.get("capabilities") or []]))
    parameters = [line.split(None, 1) for line in (info.get("parameters") or "").splitlines() if line.strip()]
    sections.append(("Parameters", [(p[0], p[1] if len(p) > 1 else "") for p in parameters]))
    sections.append(("System", [(line, "") for line in _head(info.get("system") or "")]))
    sections.append(("License", [(line, "") for line in _head(info.get("license") or "")]))
    if verbose:
        sections.append(("Metadata", [(k, _short(v)) for k, v in sorted(model_info.items())]))
    out: list[str] = []
    for title, pairs in sections:
        if not pairs:
            continue
        width = max(len(k) for k, _ in pairs)
        out.append(f"  {title}")
        out.extend(f"    {k.ljust(width)}    {v}".rstrip() if v else f"    {k}" for k, v in pairs)
        out.append("")
    return "\n".join(out)


def _head(text: str, n: int = 2) -> list[str]:
    """The first n non-empty lines, and `...` when there are more (as ollama shows System and License)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return [*lines[:n], "..."] if len(lines) > n else lines


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _human_number(n: int) -> str:
    """134515008 -> 134.52M, 8030261248 -> 8.0B (ollama's format.HumanNumber)."""
    for unit, scale, digits in (("B", 10**9, 1), ("M", 10**6, 2), ("K", 10**3, 1)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value.is_integer() else f"{value:.{digits}f}{unit}"
    return str(n)
