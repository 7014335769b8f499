// Unit tests of the LCB1 checkpoint-batch codec: known-answer vectors built by hand from the
// format description, round trips checked against plain LZ4, and every way decoding must fail.
#include <lz4.h>
#include <tbb/task_arena.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "core/byte_io.h"
#include "core/checkpoint_batch.h"
#include "core/errors.h"

#include "check.h"

using namespace streamstate;
using streamstate::test::check_summary;

namespace {

std::string from_hex(std::string_view hex) {
  std::string out;
  for (std::size_t i = 0; i + 1 < hex.size(); i += 2) {
    out.push_back(static_cast<char>(std::stoi(std::string(hex.substr(i, 2)), nullptr, 16)));
  }
  return out;
}

// Runs fn and returns the CorruptDataError message, or "" when nothing (or something else)
// was thrown.
std::string corrupt_message(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const CorruptDataError& e) {
    return e.what();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unexpected exception type: %s\n", e.what());
    return "";
  }
  return "";
}

bool contains(const std::string& text, std::string_view part) {
  return text.find(part) != std::string::npos;
}

struct Entry {
  std::string key;
  std::string data;
};

std::vector<BatchEntryView> views_of(const std::vector<Entry>& entries) {
  std::vector<BatchEntryView> views;
  for (const Entry& e : entries) views.push_back({e.key, e.data});
  return views;
}

bool same(const DecodedBatch& batch, const std::vector<Entry>& expected) {
  if (batch.entries().size() != expected.size()) return false;
  for (std::size_t i = 0; i < expected.size(); ++i) {
    if (batch.entries()[i].key != expected[i].key) return false;
    if (batch.entries()[i].data != expected[i].data) return false;
  }
  return true;
}

// The plain concatenation the format defines, for checking the compressed block with LZ4
// directly (independently of decode_batch's parsing).
std::string plain_body(const std::vector<Entry>& entries) {
  std::string body;
  for (const Entry& e : entries) {
    put_u32(body, static_cast<std::uint32_t>(e.key.size()));
    body += e.key;
    put_u32(body, static_cast<std::uint32_t>(e.data.size()));
    body += e.data;
  }
  return body;
}

// Hand-built vectors (python: struct + google_crc32c, LZ4 sequences written by hand).
// 1: entries [("a", b"xyz")], a literals-only LZ4 block, CRC32C 0xd2878d71.
constexpr std::string_view kVectorV2 =
    "4c43423102000000010000000c000000718d87d20c000000c001000000610300000078797a";
// The same entries as version 1 (no CRC field).
constexpr std::string_view kVectorV1 =
    "4c43423101000000010000000c0000000c000000c001000000610300000078797a";
// 2: entries [("k", b"abcd" * 8)]: 13 literals then a match (offset 4, length 23), then 5
// literals. CRC32C 0x3bff8da8.
constexpr std::string_view kVectorMatch =
    "4c434231020000000100000029000000a88dff3b29000000df010000006b2000000061626364040004506461626364";

void test_known_answers() {
  const DecodedBatch v2 = decode_batch(from_hex(kVectorV2));
  CHECK(v2.version() == 2);
  CHECK(same(v2, {{"a", "xyz"}}));
  const DecodedBatch v1 = decode_batch(from_hex(kVectorV1));
  CHECK(v1.version() == 1);
  CHECK(same(v1, {{"a", "xyz"}}));
  std::string abcd;
  for (int i = 0; i < 8; ++i) abcd += "abcd";
  CHECK(same(decode_batch(from_hex(kVectorMatch)), {{"k", abcd}}));

  // Our encoder writes the same header and, for a body too small to compress, the same
  // literals-only block byte for byte.
  const std::vector<Entry> entries = {{"a", "xyz"}};
  CHECK(encode_batch(views_of(entries)) == from_hex(kVectorV2));
}

std::vector<Entry> random_entries(std::mt19937_64& rng, std::size_t max_entries) {
  std::vector<Entry> entries(rng() % (max_entries + 1));
  for (Entry& e : entries) {
    e.key = "key-" + std::to_string(rng() % 1000);
    const std::size_t size = rng() % 5 == 0 ? rng() % 20000 : rng() % 300;
    switch (rng() % 4) {
      case 0:  // incompressible
        for (std::size_t i = 0; i < size; ++i) e.data.push_back(static_cast<char>(rng()));
        break;
      case 1:  // one long run: long matches
        e.data.assign(size, 'z');
        break;
      case 2:  // short repeats: many short sequences
        for (std::size_t i = 0; i < size; ++i) e.data.push_back("abcab\0"[i % 6]);
        break;
      default:  // mostly-repeating with noise
        for (std::size_t i = 0; i < size; ++i) {
          e.data.push_back(rng() % 8 == 0 ? static_cast<char>(rng()) : static_cast<char>(i % 7));
        }
    }
  }
  return entries;
}

void check_round_trip(const std::vector<Entry>& entries,
                      BatchCompression compression = BatchCompression::kLz4) {
  const std::string raw = encode_batch(views_of(entries), compression);
  const DecodedBatch batch = decode_batch(raw);
  CHECK(batch.version() == 2);
  CHECK(same(batch, entries));
  // The block on its own is valid LZ4 and holds exactly the plain body.
  const std::string body = plain_body(entries);
  std::string out(body.size() + 1, '\0');
  const int n = LZ4_decompress_safe(raw.data() + 24, out.data(), static_cast<int>(raw.size() - 24),
                                    static_cast<int>(out.size()));
  CHECK(n == static_cast<int>(body.size()));
  CHECK(out.substr(0, body.size()) == body);
  CHECK(load_u32(raw.data() + 12) == body.size());
  CHECK(load_u32(raw.data() + 20) == body.size());
}

void test_round_trips() {
  std::mt19937_64 rng(42);
  for (int trial = 0; trial < 200; ++trial) check_round_trip(random_entries(rng, 30));
  // Bodies above the parallel threshold (rendered and copied in slices), with two worker
  // slots even on a one-core machine, and the same on one thread.
  std::vector<Entry> big;
  while (plain_body(big).size() < (std::size_t{9} << 20)) {
    for (Entry& e : random_entries(rng, 30)) big.push_back(std::move(e));
  }
  tbb::task_arena two(2);
  two.execute([&] { check_round_trip(big); });
  tbb::task_arena one(1);
  one.execute([&] { check_round_trip(big); });
}

void test_stored_and_auto_bodies() {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 100; ++trial) {
    const std::vector<Entry> entries = random_entries(rng, 30);
    check_round_trip(entries, BatchCompression::kStored);
    check_round_trip(entries, BatchCompression::kAuto);
    // Stored: the body as one literal run, so the block is the body plus its length bytes.
    const std::string raw = encode_batch(views_of(entries), BatchCompression::kStored);
    const std::size_t body = plain_body(entries).size();
    CHECK(raw.size() == kBatchHeaderSizeV2 + lz4_stored_size(body));
    CHECK(raw.substr(raw.size() - body) == plain_body(entries));
  }
  // Literal runs at the edges of the length coding (14, 15, 15 + 255, ...).
  for (const std::size_t n : {0u, 1u, 14u, 15u, 16u, 269u, 270u, 271u, 524u, 525u}) {
    check_round_trip({{"", std::string(n > 8 ? n - 8 : 0, 'q')}}, BatchCompression::kStored);
  }
  // Auto: incompressible bytes are stored, a run compresses, and small bodies always do.
  std::vector<Entry> noise = {{"v", std::string(std::size_t{2} << 20, '\0')}};
  for (char& c : noise[0].data) c = static_cast<char>(rng());
  CHECK(choose_batch_compression(views_of(noise), plain_body(noise).size()) ==
        BatchCompression::kStored);
  CHECK(encode_batch(views_of(noise), BatchCompression::kAuto) ==
        encode_batch(views_of(noise), BatchCompression::kStored));
  const std::vector<Entry> run = {{"v", std::string(std::size_t{2} << 20, 'z')}};
  CHECK(choose_batch_compression(views_of(run), plain_body(run).size()) ==
        BatchCompression::kLz4);
  noise[0].data.resize(1000);
  CHECK(choose_batch_compression(views_of(noise), plain_body(noise).size()) ==
        BatchCompression::kLz4);
  check_round_trip(noise, BatchCompression::kAuto);
}

void test_empty_batch() {
  const std::string raw = encode_batch({});
  const DecodedBatch batch = decode_batch(raw);
  CHECK(batch.entries().empty());
  CHECK(batch.body_size() == 0);
  const std::vector<Entry> empties = {{"", ""}, {"", ""}};
  CHECK(same(decode_batch(encode_batch(views_of(empties))), empties));
}

void test_max_body_size_is_refused_before_decoding() {
  const std::vector<Entry> entries = {{"k", std::string(1000, 'x')}};
  const std::string raw = encode_batch(views_of(entries));
  const std::size_t body = 8 + 1 + 1000;
  CHECK(same(decode_batch(raw, body), entries));
  CHECK(contains(corrupt_message([&] { (void)decode_batch(raw, body - 1); }),
                 "exceeds max_size 1008"));
  // A small, valid batch that expands a lot is refused by its claimed size alone.
  const std::vector<Entry> zeros = {{"z", std::string(std::size_t{4} << 20, '\0')}};
  const std::string bomb = encode_batch(views_of(zeros));
  CHECK(bomb.size() < (std::size_t{64} << 10));
  CHECK(contains(corrupt_message([&] { (void)decode_batch(bomb, std::size_t{1} << 20); }),
                 "exceeds max_size 1048576"));
  CHECK(decode_batch(bomb).body_size() == 8 + 1 + (std::size_t{4} << 20));
}

void test_header_errors() {
  CHECK(contains(corrupt_message([] { (void)decode_batch("LCB"); }), "too short"));
  CHECK(contains(corrupt_message([] { (void)decode_batch(""); }), "too short"));
  std::string bad_magic = from_hex(kVectorV2);
  bad_magic[0] = 'X';
  CHECK(contains(corrupt_message([&] { (void)decode_batch(bad_magic); }), "invalid batch magic"));
  std::string version = from_hex(kVectorV2);
  version[4] = 99;
  CHECK(corrupt_message([&] { (void)decode_batch(version); }) ==
        "unsupported batch version 99");
  version[4] = 0;
  CHECK(contains(corrupt_message([&] { (void)decode_batch(version); }),
                 "unsupported batch version 0"));
  const std::string v2 = from_hex(kVectorV2);
  CHECK(contains(corrupt_message([&] { (void)decode_batch(v2.substr(0, 19)); }),
                 "too short for v2 header"));
  CHECK(contains(corrupt_message([&] { (void)decode_batch(v2.substr(0, 22)); }),
                 "CRC32C mismatch"));
  std::string crc = v2;
  crc[16] ^= 1;
  CHECK(contains(corrupt_message([&] { (void)decode_batch(crc); }), "CRC32C mismatch"));
  const std::string v1 = from_hex(kVectorV1);
  CHECK(contains(corrupt_message([&] { (void)decode_batch(v1.substr(0, 18)); }), "too short"));
}

// A version-1 batch (no CRC to fix up) around a literals-only block holding `body`.
std::string v1_batch(std::uint32_t count, std::string_view body, std::int64_t declared = -1) {
  std::string raw(kBatchMagic, 4);
  put_u32(raw, 1);
  put_u32(raw, count);
  put_u32(raw, declared < 0 ? static_cast<std::uint32_t>(body.size())
                            : static_cast<std::uint32_t>(declared));
  put_u32(raw, static_cast<std::uint32_t>(body.size()));
  // Literals-only block: token, length bytes, literals.
  std::size_t n = body.size();
  raw.push_back(static_cast<char>((n < 15 ? n : 15) << 4));
  if (n >= 15) {
    for (n -= 15; n >= 255; n -= 255) raw.push_back(static_cast<char>(255));
    raw.push_back(static_cast<char>(n));
  }
  raw += body;
  return raw;
}

std::string body_of(const std::vector<Entry>& entries) { return plain_body(entries); }

void test_body_errors() {
  const std::vector<Entry> two_entries = {{"a", "1111111111"}, {"b", "2222222222"}};
  const std::string two = body_of(two_entries);  // 40 bytes: room for a count of up to 5
  CHECK(same(decode_batch(v1_batch(2, two)), two_entries));
  CHECK(contains(corrupt_message([&] { (void)decode_batch(v1_batch(3, two)); }),
                 "entry count mismatch: the header says 3 entries, the body holds 2"));
  CHECK(contains(corrupt_message([&] { (void)decode_batch(v1_batch(1, two)); }),
                 "entry count mismatch: the header says 1 entries, the body holds 2"));
  CHECK(contains(corrupt_message([&] { (void)decode_batch(v1_batch(2, two + "xyz")); }),
                 "3 trailing bytes"));
  CHECK(contains(corrupt_message([&] { (void)decode_batch(v1_batch(2, two.substr(0, 32))); }),
                 "batch entry 1: "));
  CHECK(contains(corrupt_message([&] { (void)decode_batch(v1_batch(2, two, 99)); }),
                 "header claims 99 uncompressed bytes"));
  const std::string bad_key = body_of({{"ok", "1"}, {std::string("\xc3\x28", 2), "2"}});
  CHECK(contains(corrupt_message([&] { (void)decode_batch(v1_batch(2, bad_key)); }),
                 "batch entry 1: key is not valid UTF-8"));
  // A count that cannot fit, and a size no LZ4 block this short can produce: refused before
  // anything is allocated for them.
  CHECK(contains(corrupt_message([&] { (void)decode_batch(v1_batch(0xFFFFFFFF, two)); }),
                 "cannot fit"));
  std::string huge = v1_batch(1, two);
  store_u32(huge.data() + 12, 0x7FFFFFF0u);
  store_u32(huge.data() + 16, 0x7FFFFFF0u);
  CHECK(contains(corrupt_message([&] { (void)decode_batch(huge); }), "exceeds"));
  store_u32(huge.data() + 12, 1u << 30);
  store_u32(huge.data() + 16, 1u << 30);
  CHECK(contains(corrupt_message([&] { (void)decode_batch(huge); }), "impossible"));
  // A block that is not LZ4.
  std::string garbage = v1_batch(2, two);
  garbage[20] = 0x0F;  // no literals, then a match reaching back before the start
  const std::string lz4_message = corrupt_message([&] { (void)decode_batch(garbage); });
  CHECK(contains(lz4_message, "batch body: lz4"));
}

void test_every_mutation_of_v2_is_detected() {
  std::vector<Entry> entries = {{"partition-0/agg", std::string(200, 'x')},
                                {"partition-1/agg", "some state"},
                                {"p2", ""}};
  const std::string raw = encode_batch(views_of(entries));
  for (std::size_t i = 0; i < raw.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      std::string bad = raw;
      bad[i] = static_cast<char>(bad[i] ^ (1 << bit));
      CHECK(!corrupt_message([&] { (void)decode_batch(bad); }).empty());
    }
  }
  for (std::size_t n = 0; n < raw.size(); ++n) {
    CHECK(!corrupt_message([&] { (void)decode_batch(raw.substr(0, n)); }).empty());
  }
  CHECK(!corrupt_message([&] { (void)decode_batch(raw + "!"); }).empty());
}

void test_random_input_never_crashes() {
  std::mt19937_64 rng(7);
  const std::string valid = encode_batch(views_of(random_entries(rng, 20)));
  for (int trial = 0; trial < 3000; ++trial) {
    std::string input;
    if (trial % 2 == 0) {
      input = valid;
      for (int k = 0; k < 1 + static_cast<int>(rng() % 4); ++k) {
        input[rng() % input.size()] = static_cast<char>(rng());
      }
      if (rng() % 4 == 0) input.resize(rng() % input.size());
      if (rng() % 3 == 0) input[4] = 1;  // as version 1: no CRC to stop the damage
    } else {
      input = std::string(kBatchMagic, 4);
      put_u32(input, 1 + static_cast<std::uint32_t>(rng() % 2));
      const std::size_t n = rng() % 200;
      for (std::size_t i = 0; i < n; ++i) input.push_back(static_cast<char>(rng()));
    }
    try {
      (void)decode_batch(input);
    } catch (const CorruptDataError&) {
    }
  }
}

void test_encode_refusals() {
  const std::vector<Entry> bad = {{std::string("\xff", 1), "x"}};
  bool refused = false;
  try {
    (void)encode_batch(views_of(bad));
  } catch (const InvalidArgument& e) {
    refused = contains(e.what(), "not valid UTF-8");
  }
  CHECK(refused);
  // Sizes are checked before any byte is read, so views of memory that does not exist are
  // enough to exercise the limits.
  const char* nowhere = "";
  const std::vector<BatchEntryView> too_big_for_lz4 = {{"k", {nowhere, kBatchMaxBody}}};
  std::string message;
  try {
    (void)batch_body_size(too_big_for_lz4);
  } catch (const InvalidArgument& e) {
    message = e.what();
  }
  CHECK(contains(message, "LZ4's block limit"));
  const std::vector<BatchEntryView> too_big_for_format = {{"k", {nowhere, kBatchMaxBody}},
                                                          {"k", {nowhere, kBatchMaxBody}},
                                                          {"k", {nowhere, kBatchMaxBody}}};
  message.clear();
  try {
    (void)batch_body_size(too_big_for_format);
  } catch (const InvalidArgument& e) {
    message = e.what();
  }
  CHECK(contains(message, "4 GiB"));
}

void test_copy_data_to() {
  // Large enough for the parallel copy.
  std::vector<Entry> entries;
  std::mt19937_64 rng(3);
  for (int i = 0; i < 40; ++i) {
    Entry e;
    e.key = "k";
    e.key += std::to_string(i);
    e.data.assign(rng() % 400000, static_cast<char>('a' + i % 26));
    if (i % 7 == 0) e.data.clear();
    entries.push_back(std::move(e));
  }
  const DecodedBatch batch = decode_batch(encode_batch(views_of(entries)));
  std::vector<std::string> out(entries.size());
  std::vector<char*> destinations;
  for (std::size_t i = 0; i < entries.size(); ++i) {
    out[i].assign(entries[i].data.size(), '\0');
    destinations.push_back(out[i].data());
  }
  batch.copy_data_to(destinations);
  for (std::size_t i = 0; i < entries.size(); ++i) CHECK(out[i] == entries[i].data);
}

void test_utf8() {
  CHECK(is_valid_utf8(""));
  CHECK(is_valid_utf8("plain ascii, longer than eight bytes"));
  CHECK(is_valid_utf8("\xc3\xa9t\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"));
  CHECK(is_valid_utf8(std::string_view("\0", 1)));
  CHECK(!is_valid_utf8("\x80"));
  CHECK(!is_valid_utf8("\xc0\xaf"));          // overlong
  CHECK(!is_valid_utf8("\xe0\x80\xaf"));      // overlong
  CHECK(!is_valid_utf8("\xed\xa0\x80"));      // surrogate
  CHECK(!is_valid_utf8("\xf4\x90\x80\x80"));  // above U+10FFFF
  CHECK(!is_valid_utf8("\xf5\x80\x80\x80"));
  CHECK(!is_valid_utf8("abcdefgh\xe2\x82"));  // truncated after the fast path
  CHECK(is_valid_utf8("\xf4\x8f\xbf\xbf"));   // U+10FFFF
  CHECK(is_valid_utf8("\xee\x80\x80"));       // private use
}

}  // namespace

int main() {
  test_known_answers();
  test_round_trips();
  test_stored_and_auto_bodies();
  test_empty_batch();
  test_max_body_size_is_refused_before_decoding();
  test_header_errors();
  test_body_errors();
  test_every_mutation_of_v2_is_detected();
  test_random_input_never_crashes();
  test_encode_refusals();
  test_copy_data_to();
  test_utf8();
  return check_summary("test_checkpoint_batch");
}
