"""Kernel module load order from depmod's files, for an initramfs whose insmod resolves nothing.

Pure: takes the text of modules.dep, modules.softdep, modules.alias and modules.builtin and
returns paths in the order to load them (dependencies and "pre:" soft dependencies first).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_SUFFIX = re.compile(r"\.ko(\.xz|\.zst|\.gz)?$")


def module_name(path: str) -> str:
    """kernel/drivers/net/wireguard/wireguard.ko.xz -> wireguard (dashes as underscores)."""
    return _SUFFIX.sub("", path.rsplit("/", 1)[-1]).replace("-", "_")


@dataclass
class ModuleIndex:
    paths: dict[str, str] = field(default_factory=dict)
    deps: dict[str, list[str]] = field(default_factory=dict)
    softdeps: dict[str, list[str]] = field(default_factory=dict)
    aliases: dict[str, list[str]] = field(default_factory=dict)
    builtin: set[str] = field(default_factory=set)

    @classmethod
    def parse(cls, dep: str, softdep: str = "", alias: str = "", builtin: str = "") -> ModuleIndex:
        index = cls()
        for line in dep.splitlines():
            target, sep, rest = line.partition(":")
            if not sep:
                continue
            name = module_name(target.strip())
            index.paths[name] = target.strip()
            index.deps[name] = [module_name(p) for p in rest.split()]
        for line in softdep.splitlines():
            words = line.split()
            if len(words) < 3 or words[0] != "softdep":
                continue
            pre: list[str] = []
            mode = ""
            for word in words[2:]:
                if word in ("pre:", "post:"):
                    mode = word
                elif mode == "pre:":
                    pre.append(word)
            index.softdeps[words[1].replace("-", "_")] = pre
        for line in alias.splitlines():
            words = line.split()
            if len(words) == 3 and words[0] == "alias":
                index.aliases.setdefault(words[1], []).append(words[2].replace("-", "_"))
        index.builtin = {module_name(p) for p in builtin.split()}
        return index

    def resolve(self, wanted: str) -> list[str]:
        """Module names that provide `wanted` (a module name or an alias); [] when built in."""
        name = wanted.replace("-", "_")
        if name in self.paths:
            return [name]
        if name in self.builtin:
            return []
        if wanted in self.aliases:
            return [m for m in self.aliases[wanted] if m in self.paths]
        raise KeyError(f"kernel module {wanted!r} is neither a module, an alias nor built in")

    def load_order(self, wanted: list[str]) -> list[str]:
        """Relative paths of `wanted` and everything they need, each after what it needs."""
        order: list[str] = []
        seen: set[str] = set()

        def visit(name: str, trail: tuple[str, ...]) -> None:
            if name in seen or name in trail:
                return
            for soft in self.softdeps.get(name, []):
                try:
                    found = self.resolve(soft)
                except KeyError:
                    continue  # a soft dependency is a preference, not a need
                for provider in found:
                    visit(provider, (*trail, name))
            for dep in self.deps.get(name, []):
                visit(dep, (*trail, name))
            seen.add(name)
            order.append(self.paths[name])

        for want in wanted:
            for provider in self.resolve(want):
                visit(provider, ())
        return order

    def closure_under(self, prefixes: tuple[str, ...]) -> list[str]:
        """Paths of every module below these directories, plus what they depend on."""
        names = [n for n, p in self.paths.items() if p.startswith(prefixes)]
        return self.load_order(sorted(names))
