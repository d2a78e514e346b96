"""Benchmarks: `polygpt bench` and `polygpt bench-serve`.

run.py plans the configurations (backend x device x precision) and starts one worker each;
measure.py measures one configuration inside its worker; report.py writes JSON, CSV and
Markdown, charts.py the charts; limits.py measures the machine's ceilings (memory bandwidth,
matmul peak) the rates are judged against; serving.py load-tests `polygpt serve`. Training
speed against nanoGPT: scripts/bench_train.py and scripts/bench_speed.py.
"""
