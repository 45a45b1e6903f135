"""The service map's C and rows (templates/services.h): what a service run of a chain
calls, and what the loader writes for it."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

from bpfilter.passes.services import Marking, ServiceRun

ANY_PORT = 0x10000  # BF_SVC_ANY_PORT
_NEVER, _ALWAYS, _IN, _NOT_IN = range(4)  # enum bf_svc_when
_MARK = "IIIIIII"  # struct bf_svc_mark
SERVICE_FORMAT = "<IIIIII" + _MARK + _MARK  # struct bf_svc
ENDPOINT_FORMAT = "<IIIII" + _MARK  # struct bf_svc_ep


@dataclass(frozen=True)
class ServiceTables:
    """bf_svc's entries, without the generation: (run, address, port, protocol, value),
    and bf_svc_ep's rows."""

    keys: tuple[tuple[int, int, int, int, bytes], ...] = ()
    endpoints: tuple[bytes, ...] = ()


def service_lines(run: ServiceRun) -> list[str]:
    """No service matched, or its chain returned: on after the run."""
    return [f"{{ int v = bf_service(p, {run.number}, {int(run.partial)}); "
            "if (v != BF_NEXT) return v; }"]


def _marking(marking: Optional[Marking], slot: dict) -> tuple[int, ...]:
    if marking is None:
        return (0,) * 7
    source = marking.source
    when, net, mask = _ALWAYS, 0, 0
    if source is not None:
        when = _NOT_IN if source.negate else _IN
        net, mask = int(source.network.network_address), int(source.network.netmask)
    return (slot[marking.rule], slot[marking.mark_rule], net, mask, marking.mark.value,
            marking.mark.mask, when)


def service_tables(runs: list[ServiceRun], slots: tuple[tuple[int, ...], ...]
                   ) -> ServiceTables:
    """The rows of `runs`; `slots`: per run number, its members' counter slots."""
    keys, endpoints = [], []
    for run in runs:
        slot = dict(zip(run.members, slots[run.number]))
        for service in run.services:
            via = service.via
            value = struct.pack(SERVICE_FORMAT, slot[(run.chain, service.index)],
                                len(endpoints), len(service.endpoints), service.modulus,
                                via is not None, 0 if via is None else slot[via],
                                *_marking(service.external, slot),
                                *_marking(service.masquerade, slot))
            address = int(service.address)
            keys.append((run.number, address, service.port, service.protocol, value))
            if not run.partial:  # xtables' port match drops a packet too short for it
                keys.append((run.number, address, ANY_PORT, service.protocol,
                             bytes(len(value))))
            for e in service.endpoints:
                endpoints.append(struct.pack(
                    ENDPOINT_FORMAT, slot[e.pick], slot[e.dnat], e.probability,
                    int(e.address), 0 if e.port is None else ANY_PORT | e.port,
                    *_marking(e.hairpin, slot)))
    # One "any port" key per address and protocol (the last written wins: all zero).
    unique = {k[:4]: k for k in keys}
    return ServiceTables(tuple(unique.values()), tuple(endpoints))
