.PHONY: run test build bench benchmark clean

run:
	scripts/run-local.sh

test:
	scripts/test.sh

build:
	swift build -c release --static-swift-stdlib --product projection-runtime

bench:
	swift run -c release host-bench

benchmark:
	scripts/benchmark.sh

.PHONY: chaos
chaos:
	scripts/chaos-test.sh

clean:
	rm -rf .build
