# Two commands do all the set-up on a fresh Debian machine:
#   make run    - run xmppd on its embedded default (vhost localhost, data in ./var)
#   make test   - install what the tests need, then run the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed

export PYTHONPATH := $(CURDIR)

.PHONY: run test deps test-deps bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Editable install: the xmppctl script; PYTHONPATH lets twistd find the
	# plugin in twisted/plugins/ (PEP 660 installs hide it).
	$(PY) -m pip install --quiet -e '.[test,postgresql]'
	touch $(STAMP)

deps: $(STAMP)

test-deps: deps
	sh scripts/install-test-deps.sh

run: deps
	$(VENV)/bin/twistd -n --pidfile= xmppd $(if $(CONFIG),--config $(CONFIG))

test: test-deps
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: deps
	$(PY) bench/run.py --targets xmppd,prosody,ejabberd --quick

clean:
	rm -rf $(VENV) build *.egg-info
