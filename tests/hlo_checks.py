"""Where a compiled program's collectives sit: `nested_collectives` lists those inside control
flow (conditional, while), which XLA:CPU may start in a different order on different processes
(see `dna_jax.sharding.flat_collectives`). Reads the text of an optimised HLO module
(`jax.stages.Compiled.as_text()`, or a file written by XLA_FLAGS=--xla_dump_to).
"""

from __future__ import annotations

import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
               "all-to-all", "collective-broadcast", "all-reduce-start", "all-gather-start",
               "collective-permute-start")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"%([\w.\-]+) = .*? ([a-z][a-z\-]*)\(")
_CALLED = re.compile(r"(?:branch_computations=\{([^}]*)\}|"
                     r"(?:body|condition|to_apply|calls|true_computation|false_computation)"
                     r"=%?([\w.\-]+))")


def computations(text: str) -> tuple[dict[str, list[str]], str]:
    """({computation name: its instruction lines}, the entry computation's name)."""
    comps: dict[str, list[str]] = {}
    current, entry = None, None
    for line in text.splitlines():
        match = _HEADER.match(line)
        if match and not line.startswith(" "):
            current = match.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None:
            if line.strip() == "}":
                current = None
            else:
                comps[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def collectives(text: str) -> list[tuple[tuple[str, ...], str, str]]:
    """Every collective reachable from the entry: (the control flow around it, outermost
    first, e.g. ('conditional conditional.4',); its instruction name; its opcode)."""
    comps, entry = computations(text)
    found: list[tuple[tuple[str, ...], str, str]] = []

    def walk(name: str, around: tuple[str, ...], seen: frozenset) -> None:
        if name in seen or name not in comps:
            return
        seen = seen | {name}
        for line in comps[name]:
            match = _INSTRUCTION.search(line)
            if not match:
                continue
            instruction, opcode = match.groups()
            if opcode in COLLECTIVES:
                found.append((around, instruction, opcode))
            inner = around + ((f"{opcode} {instruction}",)
                              if opcode in ("conditional", "while") else ())
            for group, single in _CALLED.findall(line):
                for callee in (group.split(",") if group else [single]):
                    walk(callee.strip().lstrip("%"), inner, seen)

    walk(entry, (), frozenset())
    return found


def nested_collectives(text: str) -> list[tuple[tuple[str, ...], str, str]]:
    """The collectives inside a conditional or a while loop (see the module docstring)."""
    return [c for c in collectives(text) if c[0]]
