"""End-to-end model benchmarks: GPU only, skipped cleanly elsewhere (bench/conftest.py).

Run on a GPU machine (TRITON_INTERPRET unset) and keep the JSON::

    pytest bench/models --benchmark-json bench/results/models-$(date +%F).json
"""
