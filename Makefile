.PHONY: run test build bench clean

run:
	scripts/run-local.sh

test:
	scripts/test.sh

build:
	swift build -c release

bench:
	swift run -c release host-bench

clean:
	rm -rf .build
