"""Test-suite wiring: the real-Synapse harness and the relay fixtures."""

pytest_plugins = [
    "tests.harness.fixtures",
    "tests.harness.relay",
    "tests.harness.stub_homeserver",
    "tests.harness.s3_server",
]
