"""Reconciles the maintenance API with the link: where it listens and what resources it shows.

Restartable and idempotent: `reconcile(view)` may be called after every lifecycle step; it
publishes only what changed (the store ignores identical specs) and moves the listener only
when the bind target changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gatekeeper import __version__
from gatekeeper.config.siderolink import SideroLinkConfig
from gatekeeper.link.lifecycle import LinkSpec, Status
from gatekeeper.maintenance import catalog
from gatekeeper.maintenance.binding import bind_target
from gatekeeper.maintenance.server import MaintenanceBindError, MaintenanceService

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkView:
    """What the agent knows right now, as the maintenance API needs it."""

    config: SideroLinkConfig | None
    status: Status
    # The link as configured on the device (None when there is no link).
    spec: LinkSpec | None
    link_index: int
    public_key: str
    listen_port: int | None
    node_uuid: str | None
    # A configuration that failed to parse: SideroLink was meant, so no wildcard either.
    config_error: str | None = None


class MaintenanceController:
    def __init__(self, port: int) -> None:
        self.store = catalog.new_store()
        self.service = MaintenanceService(self.store, port=port)
        self._published_link: str | None = None
        self._last_error: str | None = None
        catalog.publish_version(self.store, f"v{__version__}")

    async def reconcile(self, view: LinkView) -> None:
        self._publish(view)
        spec = view.spec
        if spec is not None:
            # Readers and admins are told apart by the overlay prefix of the current link.
            self.service.overlay_prefix = str(spec.address.network)
        target = bind_target(
            siderolink_configured=view.config is not None or view.config_error is not None,
            siderolink_address=str(spec.address.ip) if spec else None,
        )
        if view.config is None and view.config_error is None:
            self.service.overlay_prefix = None
        try:
            await self.service.apply(target)
        except MaintenanceBindError as exc:
            if str(exc) != self._last_error:
                log.warning("maintenance API: %s", exc)
            self._last_error = str(exc)
        else:
            if self._last_error is not None:
                log.info("maintenance API listening on %s", self.service.target)
            self._last_error = None

    def _publish(self, view: LinkView) -> None:
        store, config, status, spec = self.store, view.config, view.status, view.spec
        if view.node_uuid:
            catalog.publish_system_information(store, uuid=view.node_uuid)
        if config is None:
            catalog.clear_siderolink_config(store)
        else:
            # Sensitive, admins only: in full, as Talos has it (docs/compatibility.md).
            catalog.publish_siderolink_config(
                store,
                api_endpoint=config.api.url(),
                host=config.api.target(),
                join_token=config.api.join_token,
                insecure=not config.api.tls,
                tunnel=config.api.grpc_tunnel,
            )
            catalog.publish_siderolink_status(
                store,
                host=config.api.host,  # bare, as Talos stores it: no brackets, no port
                connected=status.connected,
                link_name=status.link_name or "",
                tunnel=status.tunnel,
            )
        if config is not None and spec is not None and spec.grpc_peer_addr_port:
            catalog.publish_siderolink_tunnel(
                store,
                api_endpoint=config.api.url(),
                link_name=spec.name,
                mtu=spec.mtu,
                node_address=spec.grpc_peer_addr_port,
            )
        else:
            catalog.clear_siderolink_tunnel(store)
        if self._published_link and (spec is None or spec.name != self._published_link):
            catalog.remove_link_status(store, self._published_link)
            self._published_link = None
        if spec is not None:
            catalog.publish_link_status(
                store,
                spec.name,
                index=view.link_index,
                mtu=spec.mtu,
                up=status.connected,
                wireguard_public_key=view.public_key,
                wireguard_listen_port=view.listen_port,
            )
            catalog.publish_addresses(
                store, spec.name, [str(spec.address)], link_index=view.link_index
            )
            self._published_link = spec.name

    async def close(self) -> None:
        await self.service.close()
