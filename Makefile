# Thin wrappers around dev.sh, which installs everything it needs first.
.PHONY: run test bench setup lint
run:
	./dev.sh run
test:
	./dev.sh test
bench:
	./dev.sh bench
setup:
	./dev.sh setup
lint:
	./dev.sh setup && .venv/bin/ruff check . && .venv/bin/ruff format --check .
