"""The gRPC contract (channelgate.v1), generated from proto/channelgate/v1/.

Do not edit these modules: tools/generate_stubs.py writes them, and tests/test_stubs.py
checks that they match proto/.
"""
