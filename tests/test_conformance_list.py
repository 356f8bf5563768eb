"""The conformance kit run against the ListAdapter, configured from the config file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pop3sf.testing import AdapterConformance


class TestListAdapterConformance(AdapterConformance):
    adapter_type = "list"

    def make_source(self, tmp_path: Path, user: str, password: str,
                    messages: list[bytes]) -> dict[str, Any]:
        paths = []
        for i, message in enumerate(messages):
            path = tmp_path / f"m{i}.eml"
            path.write_bytes(message)
            paths.append(str(path))
        return {"users": [f"{user}:{{PLAIN}}{password}"], "messages": paths}
