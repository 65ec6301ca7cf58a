# The two commands of the README: `make demo` and `make test`.
# Each builds .venv on first use (and again when pyproject.toml changes).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml constraints.txt Makefile scripts/install.sh | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: setup browser demo lint test

$(STAMP):
	test -x $(PY) || python3 -m venv $(VENV)
	scripts/install.sh $(VENV)
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

demo: setup
	$(VENV)/bin/raysel demo

# Debian's chromium for the report's browser test; as root it is installed when missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "no chromium: the report's browser test skips here (apt-get install chromium chromium-driver)"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Two xdist workers, each with its own Ray cluster; tests/conftest.py schedules the modules that
# share a session run on one worker, which builds it once.
test: setup browser lint
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)
