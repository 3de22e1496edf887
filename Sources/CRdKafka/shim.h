// librdkafka (librdkafka-dev): the consumer, the producer and the mock cluster.
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
