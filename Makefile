# Two commands do all the set-up on a fresh Debian machine:
#   make run    - run xmppd on its embedded default (vhost localhost, data in ./var)
#   make test   - install what the tests need, then run the whole suite
# and one installs it for systemd (see README.rst, "systemd"):
#   make install PREFIX=/opt/xmppd
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed

export PYTHONPATH := $(CURDIR)

.PHONY: run test deps test-deps bench clean install

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Editable install: the xmppctl script; PYTHONPATH lets twistd find the
	# plugin in twisted/plugins/ (PEP 660 installs hide it).
	$(PY) -m pip install --quiet -e '.[test,postgresql,cluster]'
	touch $(STAMP)

deps: $(STAMP)

test-deps: deps
	sh scripts/install-test-deps.sh

run: deps
	$(VENV)/bin/twistd -n --pidfile= xmppd $(if $(CONFIG),--config $(CONFIG))

test: test-deps
	$(PY) -m pytest -q -p no:cacheprovider tests

# install: a self-contained venv in PREFIX with xmppd installed as a normal
# (non-editable) package, so twistd finds the plugin in the venv's
# site-packages/twisted/plugins; no PYTHONPATH, no checkout needed at run
# time.  Twisted's plugin cache is built at install time: under systemd the
# venv is read-only (ProtectSystem=strict) and twistd would warn at every
# start.  Also writes the systemd unit with its paths pointed at PREFIX.
PREFIX ?= /opt/xmppd
EXTRAS ?= postgresql
DEST := $(abspath $(PREFIX))
# The checkout must not shadow what is being installed.
INSTALL_ENV := env -u PYTHONPATH -u VIRTUAL_ENV

install:
	$(INSTALL_ENV) $(PYTHON) -m venv $(DEST)
	$(INSTALL_ENV) $(DEST)/bin/python -m pip install --quiet $(if $(EXTRAS),'.[$(EXTRAS)]',.)
	cd / && $(INSTALL_ENV) $(DEST)/bin/python -c \
	    'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	install -d $(DEST)/share/xmppd
	sed 's|/opt/xmppd/|$(DEST)/|g' etc/xmppd.service > $(DEST)/share/xmppd/xmppd.service
	sed 's|/opt/xmppd/|$(DEST)/|g' etc/xmppd@.service > $(DEST)/share/xmppd/xmppd@.service
	install -m 0644 etc/xmppd.toml README.rst $(DEST)/share/xmppd/
	@echo "installed into $(DEST); unit: $(DEST)/share/xmppd/xmppd.service"

bench: deps
	$(PY) bench/run.py --targets xmppd,prosody,ejabberd --quick

clean:
	rm -rf $(VENV) build *.egg-info
