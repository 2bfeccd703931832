"""The local stack: `make run` (`python -m deploy.devstack.stack`) and the test suite's
servers. It stands above both services and may import them (the stack makes the development
CA with cert_service's code); nothing in `cert_service`, `key_service` or `shared` imports it,
so what `make run` needs never ships with, or runs inside, a service (docs/architecture.md).
"""
