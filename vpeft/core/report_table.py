"""The table :func:`vpeft.apply_method` returns: what was wrapped and what trains, with the head shown apart."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Report:
    method: str
    adapter: str
    rows: list[tuple[str, str, int]]  # (target, base type, trainable parameters)
    heads: list[tuple[str, int]]  # (head module, trainable parameters of this adapter's copy)
    base_total: int  # parameters of the base model, adapters excluded
    plugins: list[str] = field(default_factory=list)  # the adapter's plug-ins with their options (vpeft.plugins)

    @property
    def trainable(self) -> int:
        """Trainable parameters without the head: the number leaderboards compare."""
        return sum(n for *_, n in self.rows)

    @property
    def head(self) -> int:
        return sum(n for _, n in self.heads)

    def __str__(self) -> str:
        width = max([len(r[0]) for r in self.rows] + [len(h[0]) for h in self.heads] + [24])
        lines = [
            f"vpeft: method {self.method!r}, adapter {self.adapter!r}",
            f"{'target':<{width}}  {'type':<18} params",
        ]
        lines += [f"{name:<{width}}  {kind:<18} {n:,}" for name, kind, n in self.rows]
        lines += [f"{name:<{width}}  {'head':<18} {n:,}" for name, n in self.heads]
        pct = 100.0 * self.trainable / max(self.base_total, 1)
        lines.append(
            f"{len(self.rows)} targets; trainable {self.trainable:,} without head ({pct:.3f}% of {self.base_total:,}),"
            f" head {self.head:,}, total trainable {self.trainable + self.head:,}"
        )
        lines += [f"plug-in {p}" for p in self.plugins]
        return "\n".join(lines)

    __repr__ = __str__
