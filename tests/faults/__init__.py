"""The fault suite: issue 8's eight points, proved by counting under real faults.

One stack of real processes (`stack.py`: PostgreSQL, Redis, cert_service, key_service,
Envoy), steady load recorded call by call (`load.py`), and faults sent as signals to the
processes the suite started. Run it alone with `.venv/bin/pytest -q tests/faults -s`: `-s`
shows the figures each test measured.

| point | test |
| --- | --- |
| 1 revocation survives a Redis hang and a key_service restart | `test_revocation.py` |
| 2 abandoned provisions leave nothing; `request_id` retries | `test_postgres.py` |
| 3 PostgreSQL outage: UNAVAILABLE fast, cached reads, writes back | `test_postgres.py` |
| 4 delete cascade after a key_service outage | `test_cascade.py` |
| 5 counters: flush interval, SIGKILL, graceful stop | `test_counters.py` |
| 6 SIGTERM under load fails no accepted RPC | `test_counters.py` |
| 7 Redis hang: few slow requests, the breaker gauge | `test_redis.py` |
| 8 Redis restart: at most one extra rate-limit burst | `test_redis.py` |
"""
