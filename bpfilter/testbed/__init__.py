"""Throwaway hosts for the demo, the tests and the benchmarks: network namespaces
(netns), a client and server joined by veths (veth), an in-kernel packet generator
(traffic), and `bpfilter demo` on top of them (demo)."""

from bpfilter.testbed.veth import (CLIENT_ADDR, CLIENT_ADDR6, FAR_NET, FAR_NET6, SERVER_ADDR,
                                   SERVER_ADDR6, SERVER_NET, SERVER_NET6, VethBed)

__all__ = ["CLIENT_ADDR", "CLIENT_ADDR6", "FAR_NET", "FAR_NET6", "SERVER_ADDR", "SERVER_ADDR6",
           "SERVER_NET", "SERVER_NET6", "VethBed"]
