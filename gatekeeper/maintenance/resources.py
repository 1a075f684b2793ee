"""An in-memory, COSI-like resource store: typed definitions, versioned resources, watches.

The agent publishes what it knows (SideroLink status, the overlay link, ...) with `put`; the
maintenance API reads it back with `get`, `list` and `watch`. Nothing here knows about gRPC.

Semantics follow COSI where a client could tell the difference:
- a resource's version starts at 1 and goes up by one on every change; putting an unchanged
  spec is a no-op (no version bump, no event), so publishers may re-publish freely;
- watching a kind can start with the current contents (CREATED events) and a BOOTSTRAPPED
  marker; watching one id starts with its current state (CREATED, or DESTROYED when absent);
- every defined type is itself published as a ResourceDefinitions.meta.cosi.dev resource in
  namespace `meta`, so a generic client can discover types, aliases and printed columns.

Not thread-safe: call every method from the event loop that runs the watchers.
"""

from __future__ import annotations

import asyncio
import enum
import re
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

META_NAMESPACE = "meta"
RESOURCE_DEFINITION_TYPE = "ResourceDefinitions.meta.cosi.dev"
NAMESPACE_TYPE = "Namespaces.meta.cosi.dev"

PHASE_RUNNING = "running"
PHASE_TEARING_DOWN = "tearingDown"

# A watcher that falls this far behind is cut off rather than buffering without bound.
WATCH_QUEUE_LIMIT = 1024

_NAME = re.compile(r"^[A-Z][A-Za-z0-9-]+$")
_SUFFIX = re.compile(r"^[a-z][a-z0-9-]+(\.[a-z][a-z0-9-]+)*$")


class ResourceError(Exception):
    """Base of the errors a reader can get; the message is meant for the user."""


class InvalidRequest(ResourceError):
    """The request itself is malformed (missing type, missing id, ...)."""


class NotFound(ResourceError):
    """Unknown type or namespace, or no resource with that id."""


class WatchOverflow(ResourceError):
    """The watcher did not keep up and was dropped."""


class FieldKind(enum.Enum):
    """How a spec field is encoded in proto_spec (protobuf wire types of the scalar kinds)."""

    STRING = "string"
    BOOL = "bool"
    UINT = "uint"
    STRINGS = "strings"
    # "[addr]:port" in YAML; Talos's common.NetIPPort {bytes ip = 1; int32 port = 2} on the wire.
    ADDR_PORT = "addr_port"


@dataclass(frozen=True)
class SpecField:
    """One spec key with its protobuf field number, as the type's upstream spec message has it."""

    name: str
    number: int
    kind: FieldKind = FieldKind.STRING


@dataclass(frozen=True)
class PrintColumn:
    """An extra table column for generic clients; json_path is a template like `{.host}`."""

    name: str
    json_path: str


@dataclass(frozen=True)
class ResourceDefinition:
    """A resource type: `Plurals.suffix.domain`, where it lives, how it is shown, who may read it.

    `proto_fields` lists the spec keys that go into proto_spec; keys not listed there still
    appear in yaml_spec. Types without proto_fields get an empty proto_spec.
    """

    type: str
    default_namespace: str
    aliases: tuple[str, ...] = ()
    print_columns: tuple[PrintColumn, ...] = ()
    sensitive: bool = False
    proto_fields: tuple[SpecField, ...] = ()
    display_type: str = field(init=False)
    all_aliases: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        name, _, suffix = self.type.partition(".")
        if not suffix or not _NAME.match(name) or not _SUFFIX.match(suffix):
            raise ValueError(
                f"resource type {self.type!r} must look like Plurals.suffix.domain "
                "(CamelCase plural name, lowercase dotted suffix)"
            )
        if not self.default_namespace:
            raise ValueError(f"resource type {self.type!r} needs a default namespace")
        # The same derivation COSI applies, so clients match the same aliases.
        display = _singular(name)
        aliases = [*self.aliases, display.lower()]
        all_aliases = [name.lower()]
        parts = suffix.split(".")
        all_aliases += [".".join([name.lower(), *parts[:i]]) for i in range(1, len(parts))]
        upper = "".join(ch for ch in name if ch.isupper())
        if len(upper) > 1:
            aliases.append(upper.lower())
            if not upper.endswith("S"):
                aliases.append(upper.lower() + "s")
        object.__setattr__(self, "display_type", display)
        object.__setattr__(self, "aliases", tuple(dict.fromkeys(aliases)))
        object.__setattr__(self, "all_aliases", tuple(dict.fromkeys(all_aliases + aliases)))

    @property
    def id(self) -> str:
        """The id of this definition's own ResourceDefinitions resource."""
        return self.type.lower()

    def matches(self, name: str) -> bool:
        """Whether a user-typed name (type, id or any alias, any case) designates this type."""
        folded = name.casefold()
        return folded == self.id or any(folded == a.casefold() for a in self.all_aliases)

    def spec(self) -> dict[str, Any]:
        """The ResourceDefinition spec, with COSI's YAML keys and order."""
        out: dict[str, Any] = {
            "type": self.type,
            "displayType": self.display_type,
            "defaultNamespace": self.default_namespace,
            "aliases": list(self.aliases),
            "allAliases": list(self.all_aliases),
            "printColumns": [{"name": c.name, "jsonPath": c.json_path} for c in self.print_columns],
        }
        if self.sensitive:
            out["sensitivity"] = "sensitive"
        return out


def _singular(plural: str) -> str:
    """English singular of a CamelCase plural, for the names resource types use."""
    for suffix, repl in (("ies", "y"), ("sses", "ss"), ("ses", "s"), ("xes", "x"), ("s", "")):
        if plural.endswith(suffix) and len(plural) > len(suffix):
            # "Statuses" -> "Status", "Addresses" -> "Address", "Informations" -> "Information"
            if suffix == "ses" and not plural.endswith(("uses", "sses")):
                continue
            return plural[: -len(suffix)] + repl
    return plural


@dataclass(frozen=True)
class Resource:
    """One immutable version of a resource; `spec` is a read-only mapping."""

    namespace: str
    type: str
    id: str
    version: int
    spec: Mapping[str, Any]
    phase: str = PHASE_RUNNING
    owner: str = ""
    created: float = 0.0
    updated: float = 0.0
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.namespace, self.type, self.id)


class EventType(enum.IntEnum):
    """Numbered as cosi.resource.EventType."""

    CREATED = 0
    UPDATED = 1
    DESTROYED = 2
    BOOTSTRAPPED = 3


@dataclass(frozen=True)
class Event:
    type: EventType
    resource: Resource | None = None
    old: Resource | None = None


@dataclass
class _Watcher:
    namespace: str
    type: str
    id: str | None
    queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    overflowed: bool = False

    def wants(self, r: Resource) -> bool:
        return (
            r.namespace == self.namespace
            and r.type == self.type
            and (self.id is None or r.id == self.id)
        )

    def offer(self, event: Event) -> None:
        if self.overflowed:
            return
        if self.queue.qsize() >= WATCH_QUEUE_LIMIT:
            self.overflowed = True
            # Wake the reader so it notices promptly.
            self.queue.put_nowait(Event(EventType.BOOTSTRAPPED))
            return
        self.queue.put_nowait(event)


class ResourceStore:
    """Typed resources by (namespace, type, id), with COSI-like versioning and watches."""

    def __init__(
        self,
        definitions: Iterable[ResourceDefinition] = (),
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._defs: dict[str, ResourceDefinition] = {}
        self._items: dict[tuple[str, str, str], Resource] = {}
        self._watchers: list[_Watcher] = []
        # Both meta types must exist before the first put publishes either of them.
        self._defs[RESOURCE_DEFINITION_TYPE] = RESOURCE_DEFINITIONS
        self._defs[NAMESPACE_TYPE] = NAMESPACES
        self.define(RESOURCE_DEFINITIONS)
        self.define(NAMESPACES)
        for rd in definitions:
            self.define(rd)

    # -- definitions ---------------------------------------------------------------------

    def define(self, rd: ResourceDefinition) -> None:
        """Register a type (idempotent for an identical definition) and publish it in `meta`."""
        known = self._defs.get(rd.type)
        if known is not None and known != rd:
            raise ValueError(f"resource type {rd.type} is already defined differently")
        self._defs[rd.type] = rd
        self.put(META_NAMESPACE, RESOURCE_DEFINITION_TYPE, rd.id, rd.spec())
        self._ensure_namespace(rd.default_namespace)

    def definitions(self) -> list[ResourceDefinition]:
        return sorted(self._defs.values(), key=lambda d: d.id)

    def definition(self, type_name: str) -> ResourceDefinition:
        """The definition of a canonical type name (case-insensitive); NotFound otherwise."""
        if not type_name:
            raise InvalidRequest("resource type is required")
        rd = self._defs.get(type_name)
        if rd is None:
            rd = next((d for d in self._defs.values() if d.id == type_name.lower()), None)
        if rd is None:
            raise NotFound(
                f"resource type {type_name!r} is not registered "
                f"(list {RESOURCE_DEFINITION_TYPE} in namespace {META_NAMESPACE!r})"
            )
        return rd

    def namespaces(self) -> list[str]:
        return sorted({i for (_ns, t, i) in self._items if t == NAMESPACE_TYPE})

    def _ensure_namespace(self, namespace: str) -> None:
        key = (META_NAMESPACE, NAMESPACE_TYPE, namespace)
        if key not in self._items:
            self.put(META_NAMESPACE, NAMESPACE_TYPE, namespace, {"description": ""})

    def _resolve(self, namespace: str, type_name: str) -> tuple[str, ResourceDefinition]:
        """Validate a (namespace, type) pair from a reader; an empty namespace means the default."""
        rd = self.definition(type_name)
        ns = namespace or rd.default_namespace
        if (META_NAMESPACE, NAMESPACE_TYPE, ns) not in self._items:
            raise NotFound(
                f"namespace {ns!r} does not exist (namespaces: {', '.join(self.namespaces())})"
            )
        return ns, rd

    # -- writes (the agent) --------------------------------------------------------------

    def put(
        self,
        namespace: str,
        type_name: str,
        id: str,
        spec: Mapping[str, Any],
        *,
        phase: str = PHASE_RUNNING,
        owner: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> Resource:
        """Create or update a resource; an identical spec/phase/labels/owner changes nothing."""
        if type_name not in self._defs:
            raise ValueError(f"resource type {type_name!r} is not defined; define() it first")
        if not namespace or not id:
            raise ValueError(f"{type_name}: namespace and id must be non-empty")
        frozen_spec = _freeze(spec)
        frozen_labels = MappingProxyType(dict(labels or {}))
        key = (namespace, type_name, id)
        old = self._items.get(key)
        if (
            old is not None
            and old.spec == frozen_spec
            and old.phase == phase
            and old.owner == owner
            and dict(old.labels) == dict(frozen_labels)
        ):
            return old
        now = self._clock()
        new = Resource(
            namespace=namespace,
            type=type_name,
            id=id,
            version=1 if old is None else old.version + 1,
            spec=frozen_spec,
            phase=phase,
            owner=owner,
            created=now if old is None else old.created,
            updated=now,
            labels=frozen_labels,
        )
        self._items[key] = new
        if type_name != NAMESPACE_TYPE or namespace != META_NAMESPACE:
            self._ensure_namespace(namespace)
        event = Event(EventType.CREATED if old is None else EventType.UPDATED, new, old)
        self._notify(new, event)
        return new

    def delete(self, namespace: str, type_name: str, id: str) -> bool:
        """Remove a resource; False when it did not exist."""
        old = self._items.pop((namespace, type_name, id), None)
        if old is None:
            return False
        self._notify(old, Event(EventType.DESTROYED, old))
        return True

    def _notify(self, r: Resource, event: Event) -> None:
        for w in self._watchers:
            if w.wants(r):
                w.offer(event)

    # -- reads (the API) -----------------------------------------------------------------

    def get(self, namespace: str, type_name: str, id: str) -> Resource:
        ns, rd = self._resolve(namespace, type_name)
        if not id:
            raise InvalidRequest(f"an id is required to get a {rd.type} resource")
        r = self._items.get((ns, rd.type, id))
        if r is None:
            raise NotFound(f"resource {rd.type}({ns}/{id}) does not exist")
        return r

    def list(self, namespace: str, type_name: str) -> list[Resource]:
        ns, rd = self._resolve(namespace, type_name)
        return sorted(
            (r for (n, t, _i), r in self._items.items() if n == ns and t == rd.type),
            key=lambda r: r.id,
        )

    def resolve(self, namespace: str, type_name: str) -> tuple[str, ResourceDefinition]:
        """Public form of the request validation: the namespace to use and the definition."""
        return self._resolve(namespace, type_name)

    async def watch(
        self,
        namespace: str,
        type_name: str,
        id: str | None = None,
        *,
        bootstrap: bool = False,
    ) -> AsyncGenerator[Event, None]:
        """Events for one kind (id None) or one resource, until the consumer stops iterating.

        A kind watch with `bootstrap` first yields CREATED for every current resource, then one
        BOOTSTRAPPED event (resource None). A single-resource watch first yields its current
        state: CREATED, or DESTROYED with a tombstone (empty spec, version 0) when absent.
        Raises WatchOverflow if the consumer falls WATCH_QUEUE_LIMIT events behind.
        """
        ns, rd = self._resolve(namespace, type_name)
        if id is not None and not id:
            raise InvalidRequest("a watch id, when given, must be non-empty")
        if id is not None and bootstrap:
            raise InvalidRequest("bootstrap contents apply to a kind watch, not to a single id")
        watcher = _Watcher(ns, rd.type, id)
        # Snapshot and registration happen without an await in between: no event is lost.
        if id is None:
            initial = (
                [Event(EventType.CREATED, r) for r in self.list(ns, rd.type)] if bootstrap else []
            )
            if bootstrap:
                initial.append(Event(EventType.BOOTSTRAPPED))
        else:
            current = self._items.get((ns, rd.type, id))
            tomb = Resource(ns, rd.type, id, 0, MappingProxyType({}))
            initial = [
                Event(EventType.CREATED, current)
                if current is not None
                else Event(EventType.DESTROYED, tomb)
            ]
        self._watchers.append(watcher)
        try:
            for event in initial:
                yield event
            while True:
                event = await watcher.queue.get()
                if watcher.overflowed:
                    raise WatchOverflow(
                        f"watch on {rd.type} fell more than {WATCH_QUEUE_LIMIT} events behind; "
                        "start a new watch"
                    )
                yield event
        finally:
            self._watchers.remove(watcher)

    @property
    def watcher_count(self) -> int:
        return len(self._watchers)


def _freeze(value: Any) -> Any:
    """Deep read-only copy of a spec: dicts become mappingproxies, lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): _freeze(v) for k, v in value.items() if v is not None})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(
        f"spec values must be str, bool, int, float, list or dict, not {type(value).__name__}"
    )


def thaw(value: Any) -> Any:
    """Plain dict/list form of a frozen spec (for YAML/JSON output)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


RESOURCE_DEFINITIONS = ResourceDefinition(
    RESOURCE_DEFINITION_TYPE,
    META_NAMESPACE,
    aliases=("api-resources",),
    print_columns=(PrintColumn("Aliases", "{.aliases[:]}"),),
)

NAMESPACES = ResourceDefinition(
    NAMESPACE_TYPE,
    META_NAMESPACE,
    aliases=("ns",),
    proto_fields=(SpecField("description", 1),),
)
