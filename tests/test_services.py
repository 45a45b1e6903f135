"""The service-map pass without the kernel: which kube-proxy shapes become one lookup and
which stay code, and that every rule keeps one counter slot. (Verdicts against the
kernel: tests/conformance/test_service_map.py and test_kube_proxy.py.)"""

from __future__ import annotations

import pytest

from bpfilter.frontend import parse_ruleset
from bpfilter.passes import validate
from bpfilter.passes.fold import fold_chains
from bpfilter.passes.services import MAX_ENDPOINTS, ServiceRun, find_services, service_runs
from bpfilter.passes.stages import counter_slots
from tests.conftest import EXAMPLES
from examples.make_kube import kube_nat, kube_nft


def _services(text: str, name: str = "kube.v4"):
    ruleset = validate(parse_ruleset(text, name))
    folds = find_services(ruleset, fold_chains(ruleset))
    return ruleset, folds, service_runs(folds)


def test_kube_proxy_services_are_one_run_and_their_chains_no_code():
    ruleset, folds, (run,) = _services(kube_nat(300))
    assert run.chain == "KUBE-SERVICES" and len(run.services) == 300
    service = run.services[0]
    assert service.masquerade is not None and service.masquerade.source.negate
    assert all(e.hairpin is not None and e.port == 8080 for e in service.endpoints)
    assert service.endpoints[-1].probability == 0x80000000  # the last rung: no statistic
    table = ruleset.table("nat")
    for chain in table.chains:
        if chain.name.startswith(("KUBE-SVC-", "KUBE-SEP-")) or chain.name == "KUBE-MARK-MASQ":
            assert folds[("nat", chain.name)] == (), chain.name
    items = folds[("nat", "KUBE-SERVICES")]
    assert isinstance(items[0], ServiceRun) and len(items) == 2  # + the NodePort rule
    slots = counter_slots(ruleset, folds)
    every_rule = {("nat", c.name, i) for c in table.chains for i in range(len(c.rules))}
    assert every_rule <= set(slots)
    assert len(set(slots.values())) == len(slots)


def test_the_program_calls_the_service_map_and_has_no_chain_per_service(tmp_path):
    from bpfilter.compiler import compile_ruleset

    source = compile_ruleset(kube_nat(300), "kube", tmp_path, emit="c").code.source
    assert "bf_service(p, 0, 0)" in source and "KUBE_SVC" not in source.replace("/*", "\n")


def _kube(**edit) -> str:
    """Three services; `edit` replaces a text of the generated ruleset."""
    text = kube_nat(3, counts=[2, 2, 2])
    for old, new in edit.values():
        assert old in text
        text = text.replace(old, new, 1)
    return text


PROBABILITY = "-m statistic --mode random --probability 0.50000000000"


@pytest.mark.parametrize("edit", [
    ("negated statistic", (PROBABILITY, "-m statistic --mode random ! --probability 0.5")),
    ("nth", (PROBABILITY, "-m statistic --mode nth --every 2 --packet 0")),
    ("DNAT port range", ("10.244.0.1:8080", "10.244.0.1:8080-8081")),
    ("another match", ("-p tcp -m comment --comment \"default/svc0:http cluster IP\" -m tcp "
                       "--dport 80 -j KUBE-SVC", "-p tcp -m tcp --dport 80 -m ttl --ttl-gt 1 "
                       "-j KUBE-SVC")),
    ("a source port", ("-m tcp --dport 80 -j KUBE-SVC-0000000000000000",
                       "-m tcp --sport 1 --dport 80 -j KUBE-SVC-0000000000000000")),
], ids=lambda e: e[0] if isinstance(e, tuple) else "")
def test_other_shapes_stay_code(edit):
    _ruleset, folds, runs = _services(_kube(edit=edit[1]))
    # service 0's dispatch rule (or its chains) changed: it stays code, the others do not
    assert [s.index for run in runs for s in run.services] == [1, 2], edit[0]
    assert folds[("nat", "KUBE-SVC-0000000000000000")] != ()


def test_a_repeated_service_key_starts_a_new_run():
    text = _kube(dup=("--dport 80 -j KUBE-SVC-0000000000000001",
                      "--dport 80 -j KUBE-SVC-0000000000000001"))
    text = text.replace("-d 10.96.0.2/32 -p tcp -m comment", "-d 10.96.0.1/32 -p tcp -m comment")
    _ruleset, _folds, runs = _services(text)
    assert [[s.index for s in run.services] for run in runs] == [[0], [1, 2]]


def test_a_ladder_longer_than_the_loop_stays_code():
    for count, runs in ((MAX_ENDPOINTS, 1), (MAX_ENDPOINTS + 1, 0)):
        _ruleset, _folds, found = _services(kube_nat(1, counts=[count]))
        assert len(found) == runs, count


def test_kube_proxy_nftables_mode_is_one_run_too():
    """One concatenated verdict map's elements are the dispatch rules, a `numgen random
    mod N` verdict map one draw (modulus N); the NodePort's external chain marks and goes
    on to the service chain, whose ClusterIP test it fails (no masquerade marking)."""
    ruleset, folds, (run,) = _services(kube_nft(300), "kube.nft")
    assert run.chain == "services" and run.partial and len(run.services) == 300
    assert {(s.modulus, len(s.endpoints)) for s in run.services} == \
        {(len(s.endpoints), len(s.endpoints)) for s in run.services}
    assert all(s.masquerade is not None for s in run.services)
    assert {k[1] for k, items in folds.items() if items == ()} >= \
        {c.name for c in ruleset.tables[0].chains if c.name.startswith(("service-", "endpoint-"))}
    example = (EXAMPLES / "kube-proxy.nft").read_text()
    _ruleset, _folds, (run,) = _services(example, "kube.nft")
    node_port = run.services[-1]
    assert (str(node_port.address), node_port.port) == ("198.18.0.1", 30443)
    assert node_port.external is not None and node_port.masquerade is None
    assert node_port.via == ("external-2ZMWWXJX-default/web/tcp/https", 1)


NUMGEN = "numgen random mod 2 vmap { 0 : goto endpoint-00000000"


@pytest.mark.parametrize("edit", [
    ("a value missing", (NUMGEN, "numgen random mod 3 vmap { 0 : goto endpoint-00000000")),
    ("inc", (NUMGEN, "numgen inc mod 2 vmap { 0 : goto endpoint-00000000")),
    ("another match", ("ip daddr 10.96.0.1 tcp dport 80 ip saddr",
                       "ip daddr 10.96.0.1 tcp dport 80 ip ttl 3 ip saddr")),
], ids=lambda e: e[0] if isinstance(e, tuple) else "")
def test_other_nftables_shapes_stay_code(edit):
    """A dispatch rule that goes to its service chain stands for it only when the chain
    always ends in a DNAT: a numgen map without every value may fall through."""
    text = kube_nft(3, counts=[2, 2, 2])
    assert edit[1][0] in text
    _ruleset, folds, runs = _services(text.replace(*edit[1], 1), "kube.nft")
    assert [s.address.packed[-1] for run in runs for s in run.services] == [2, 3], edit[0]
