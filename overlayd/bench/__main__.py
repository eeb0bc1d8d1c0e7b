import argparse
import sys

from overlayd.bench.runner import add_arguments, run_from_args

parser = argparse.ArgumentParser(prog="python -m overlayd.bench", description=__doc__)
add_arguments(parser)
sys.exit(run_from_args(parser.parse_args()))
