#include "core/record_codec.h"

#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>

#include "core/byte_io.h"
#include "core/checksum.h"
#include "core/errors.h"

namespace streamstate {
namespace {

constexpr std::size_t kMaxField = std::numeric_limits<std::uint32_t>::max();

// Both writers lay the header out here, with a zero count that seal() patches.
void write_header(char* out, std::uint16_t kind) noexcept {
  std::memcpy(out, kRecordMagic, sizeof kRecordMagic);
  out[4] = static_cast<char>(kRecordFormatVersion & 0xff);
  out[5] = static_cast<char>(kRecordFormatVersion >> 8);
  out[6] = static_cast<char>(kind & 0xff);
  out[7] = static_cast<char>(kind >> 8);
  store_u32(out + 8, 0);
}

// Patches the entry count into a container's first `size` bytes and returns the masked
// CRC32C the trailer holds.
[[nodiscard]] std::uint32_t seal(char* data, std::size_t size, std::size_t count) noexcept {
  store_u32(data + 8, static_cast<std::uint32_t>(count));
  return crc32c_mask(crc32c(std::string_view(data, size)));
}

void check_field_sizes(std::size_t key_size, std::size_t value_size) {
  if (key_size > kMaxField || value_size > kMaxField) {
    throw InvalidArgument("record codec: a key or value exceeds 4 GiB");
  }
}

[[noreturn]] void throw_too_many() {
  throw InvalidArgument("record codec: more than 2^32-1 entries");
}

void check_checksum(std::uint32_t stored, std::uint32_t actual) {
  if (stored != actual) {
    throw CorruptDataError("record codec: checksum mismatch (CRC32C stored " +
                           std::to_string(stored) + ", computed " + std::to_string(actual) + ")");
  }
}

[[noreturn]] void throw_trailing(std::size_t extra) {
  throw CorruptDataError("record codec: " + std::to_string(extra) +
                         " unexpected bytes after the last entry");
}

}  // namespace

// ----- writers -------------------------------------------------------------------------

RecordWriter::RecordWriter(std::uint16_t kind, std::size_t payload_size_hint) {
  out_.reserve(kRecordHeaderSize + payload_size_hint + kRecordTrailerSize);
  out_.resize(kRecordHeaderSize);
  write_header(out_.data(), kind);
}

namespace {

struct SpareBuffer {
  std::mutex mutex;
  std::string buffer;
};

SpareBuffer& spare_buffer() {
  static SpareBuffer spare;
  return spare;
}

}  // namespace

void recycle_record_buffer(std::string&& buffer) noexcept {
  if (buffer.capacity() < kRecycledBufferMin || buffer.capacity() > kRecycledBufferMax) return;
  SpareBuffer& spare = spare_buffer();
  const std::lock_guard lock(spare.mutex);
  if (buffer.capacity() > spare.buffer.capacity()) {
    buffer.clear();
    spare.buffer.swap(buffer);  // the smaller one is freed when `buffer` goes
  }
}

void RecordWriter::reserve_for(std::size_t more) {
  const std::size_t needed = out_.size() + more;
  if (needed <= out_.capacity() || needed < kRecycledBufferMin) return;
  std::string adopted;
  {
    SpareBuffer& spare = spare_buffer();
    const std::lock_guard lock(spare.mutex);
    if (spare.buffer.capacity() <= out_.capacity()) return;
    adopted.swap(spare.buffer);
  }
  adopted.assign(out_);  // below the capacity it had: no allocation
  out_.swap(adopted);
}

void RecordWriter::add(std::string_view key, std::string_view value) {
  check_field_sizes(key.size(), value.size());
  if (count_ == kMaxField) throw_too_many();
  reserve_for(kRecordEntryOverhead + key.size() + value.size() + kRecordTrailerSize);
  put_u32(out_, static_cast<std::uint32_t>(key.size()));
  out_.append(key);
  put_u32(out_, static_cast<std::uint32_t>(value.size()));
  out_.append(value);
  ++count_;
}

std::size_t RecordWriter::open_record(std::string_view key, std::size_t size_hint) {
  check_field_sizes(key.size(), 0);
  if (count_ == kMaxField) throw_too_many();
  reserve_for(kRecordEntryOverhead + key.size() + size_hint + kRecordTrailerSize);
  const std::size_t start = out_.size();
  put_u32(out_, static_cast<std::uint32_t>(key.size()));
  out_.append(key);
  put_u32(out_, 0);
  return start;
}

void RecordWriter::close_record(std::size_t start) {
  const std::size_t value_at = start + 4 + load_u32(out_.data() + start) + 4;
  const std::size_t value_size = out_.size() - value_at;
  if (value_size > kMaxField) {
    out_.resize(start);
    check_field_sizes(0, value_size);
  }
  store_u32(out_.data() + value_at - 4, static_cast<std::uint32_t>(value_size));
  ++count_;
}

std::string RecordWriter::finish() && {
  put_u32(out_, seal(out_.data(), out_.size(), count_));
  return std::move(out_);
}

RecordBufferWriter::RecordBufferWriter(char* out, std::size_t capacity, RecordKind kind)
    : out_(out), capacity_(capacity) {
  ensure(kRecordHeaderSize);
  write_header(out_, static_cast<std::uint16_t>(kind));
  pos_ = kRecordHeaderSize;
}

void RecordBufferWriter::begin(std::string_view key, std::size_t value_size) {
  check_field_sizes(key.size(), value_size);
  count_up();
  u32(static_cast<std::uint32_t>(key.size()));
  raw(key);
  u32(static_cast<std::uint32_t>(value_size));
}

std::size_t RecordBufferWriter::finish() {
  ensure(kRecordTrailerSize);
  const std::uint32_t masked = seal(out_, pos_, count_);
  u32(masked);
  return pos_;
}

void RecordBufferWriter::overflow() {
  throw std::logic_error("record codec: the container outgrew the buffer sized for it");
}

void RecordBufferWriter::too_many() { throw_too_many(); }

// ----- readers -------------------------------------------------------------------------

RecordHeader RecordHeader::parse(std::string_view data) {
  if (data.size() < kRecordHeaderSize + kRecordTrailerSize) {
    throw CorruptDataError("record codec: truncated: " + std::to_string(data.size()) +
                           " bytes is shorter than the 16-byte minimum");
  }
  if (std::memcmp(data.data(), kRecordMagic, sizeof kRecordMagic) != 0) {
    throw CorruptDataError("record codec: bad magic (not a streamstate snapshot)");
  }
  const std::uint16_t version = load_u16(data.data() + 4);
  if (version != kRecordFormatVersion) {
    throw CorruptDataError("record codec: unsupported version " + std::to_string(version));
  }
  RecordHeader header;
  header.kind = load_u16(data.data() + 6);
  header.count = load_u32(data.data() + 8);
  header.body = data.substr(kRecordHeaderSize,
                            data.size() - kRecordHeaderSize - kRecordTrailerSize);
  return header;
}

void RecordHeader::expect_kind(RecordKind expected) const {
  if (kind != static_cast<std::uint16_t>(expected)) {
    throw CorruptDataError("record codec: snapshot kind " + std::to_string(kind) +
                           " where kind " +
                           std::to_string(static_cast<std::uint16_t>(expected)) +
                           " was expected (written by another component)");
  }
}

void RecordHeader::check_count() const {
  if (count > body.size() / kRecordEntryOverhead) {
    throw CorruptDataError("record codec: entry count " + std::to_string(count) +
                           " cannot fit in " + std::to_string(body.size()) + " bytes");
  }
}

RecordReader::RecordReader(std::string_view data) : header_(RecordHeader::parse(data)) {
  // The checksum comes before the structural checks, so a damaged container is reported as
  // damaged rather than by whichever field the damage happened to hit.
  const std::size_t crc_offset = data.size() - kRecordTrailerSize;
  check_checksum(crc32c_unmask(load_u32(data.data() + crc_offset)),
                 crc32c(data.substr(0, crc_offset)));
  header_.check_count();
  ByteReader reader(header_.body, "record codec");
  for (std::size_t i = 0; i < header_.count; ++i) {
    (void)reader.take(reader.u32());
    (void)reader.take(reader.u32());
  }
  if (!reader.at_end()) throw_trailing(reader.remaining());
}

bool RecordReader::next(RecordView& out) noexcept {
  // Lengths were all validated by the constructor; these reads stay in bounds.
  const std::string_view body = header_.body;
  if (pos_ >= body.size()) return false;
  const std::size_t key_len = load_u32(body.data() + pos_);
  out.key = body.substr(pos_ + 4, key_len);
  pos_ += 4 + key_len;
  const std::size_t value_len = load_u32(body.data() + pos_);
  out.value = body.substr(pos_ + 4, value_len);
  pos_ += 4 + value_len;
  return true;
}

SinglePassRecordReader::SinglePassRecordReader(std::string_view data, RecordKind expected)
    : data_(data) {
  const RecordHeader header = RecordHeader::parse(data);
  header.expect_kind(expected);
  header.check_count();
  count_ = header.count;
  pos_ = kRecordHeaderSize;
  end_ = data.size() - kRecordTrailerSize;
}

void SinglePassRecordReader::finish() {
  if (index_ != count_ || pos_ != end_) throw_trailing(end_ - pos_);
  checksum_through(end_);
  check_checksum(crc32c_unmask(load_u32(data_.data() + end_)), crc_);
}

void SinglePassRecordReader::truncated(std::size_t needed) const {
  throw CorruptDataError("record codec: truncated at byte " + std::to_string(pos_) +
                         " (needed " + std::to_string(needed) + " bytes, " +
                         std::to_string(end_ - pos_) + " left)");
}

void SinglePassRecordReader::checksum_through(std::size_t end) noexcept {
  if (end <= crc_done_) return;
  crc_ = crc32c(data_.substr(crc_done_, end - crc_done_), crc_);
  crc_done_ = end;
}

std::string encode_records(std::uint16_t kind, const std::vector<RecordView>& records) {
  std::size_t payload = 0;
  for (const auto& r : records) payload += kRecordEntryOverhead + r.key.size() + r.value.size();
  RecordWriter writer(kind, payload);
  for (const auto& r : records) writer.add(r.key, r.value);
  return std::move(writer).finish();
}

}  // namespace streamstate
