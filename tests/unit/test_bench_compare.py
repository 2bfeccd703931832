"""`make bench AGAINST=...` reads the gateway benchmark's own table, not the one after it."""

from __future__ import annotations

import pytest

from tests.bench.compare import gateway_figures

# The shape bench_gateway prints: h2load's table, then one Python client's, whose direct row
# has the same label.
OUTPUT = """\
GetCertificate, 3000 sequential requests each (h2load -c 1 -m 1), cache hit, in 10 rounds
path                                 ok   p50 ms   p90 ms   p99 ms
direct gRPC to cert_service        3000    0.564    0.758    0.985
gRPC through Envoy                 3000    1.893    2.110    3.020
REST through Envoy (HTTP/1.1)      3000    1.954    2.180    3.171

GetCertificate, 3000 sequential calls each from one Python gRPC client
path                                 ok   p50 ms   p90 ms   p99 ms
direct gRPC to cert_service        3000    0.923    1.046    1.710
gRPC via Envoy, API key            3000    1.905    2.201    3.100
"""


def test_the_hop_ratio_is_read_from_the_h2load_table() -> None:
    figures = gateway_figures(OUTPUT)
    assert figures["direct p50 ms"] == 0.564
    assert figures["gRPC via Envoy p99 ms"] == 3.020
    assert figures["hop ratio gRPC (p50 / direct)"] == pytest.approx(1.893 / 0.564)
    assert figures["hop ratio REST (p50 / direct)"] == pytest.approx(1.954 / 0.564)
