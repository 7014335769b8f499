#include "core/record_codec.h"

#include <cstring>
#include <limits>

#include "core/byte_io.h"
#include "core/checksum.h"
#include "core/errors.h"

namespace streamstate {
namespace {

constexpr std::size_t kMaxField = std::numeric_limits<std::uint32_t>::max();

}  // namespace

RecordWriter::RecordWriter(std::uint16_t kind, std::size_t payload_size_hint) {
  out_.reserve(kRecordHeaderSize + payload_size_hint + kRecordTrailerSize);
  out_.append(kRecordMagic, sizeof kRecordMagic);
  put_u16(out_, kRecordFormatVersion);
  put_u16(out_, kind);
  put_u32(out_, 0);  // entry count, patched by finish()
}

void RecordWriter::add(std::string_view key, std::string_view value) {
  if (key.size() > kMaxField || value.size() > kMaxField) {
    throw InvalidArgument("record codec: a key or value exceeds 4 GiB");
  }
  if (count_ == kMaxField) throw InvalidArgument("record codec: more than 2^32-1 entries");
  put_u32(out_, static_cast<std::uint32_t>(key.size()));
  out_.append(key);
  put_u32(out_, static_cast<std::uint32_t>(value.size()));
  out_.append(value);
  ++count_;
}

std::string RecordWriter::finish() && {
  store_u32(out_.data() + 8, static_cast<std::uint32_t>(count_));
  put_u32(out_, crc32c_mask(crc32c(out_)));
  return std::move(out_);
}

RecordReader::RecordReader(std::string_view data) {
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
  const std::size_t crc_offset = data.size() - kRecordTrailerSize;
  const std::uint32_t stored = crc32c_unmask(load_u32(data.data() + crc_offset));
  const std::uint32_t actual = crc32c(data.substr(0, crc_offset));
  if (stored != actual) {
    throw CorruptDataError("record codec: checksum mismatch (CRC32C stored " +
                           std::to_string(stored) + ", computed " + std::to_string(actual) + ")");
  }
  kind_ = load_u16(data.data() + 6);
  count_ = load_u32(data.data() + 8);
  body_ = data.substr(kRecordHeaderSize, crc_offset - kRecordHeaderSize);
  // Each entry takes at least 8 bytes, so an impossible count fails before any work.
  if (count_ > body_.size() / kRecordEntryOverhead) {
    throw CorruptDataError("record codec: entry count " + std::to_string(count_) +
                           " cannot fit in " + std::to_string(body_.size()) + " bytes");
  }
  ByteReader reader(body_, "record codec");
  for (std::size_t i = 0; i < count_; ++i) {
    (void)reader.take(reader.u32());
    (void)reader.take(reader.u32());
  }
  if (!reader.at_end()) {
    throw CorruptDataError("record codec: " + std::to_string(reader.remaining()) +
                           " unexpected bytes after the last entry");
  }
}

void RecordReader::expect_kind(RecordKind expected) const {
  if (kind_ != static_cast<std::uint16_t>(expected)) {
    throw CorruptDataError("record codec: snapshot kind " + std::to_string(kind_) +
                           " where kind " +
                           std::to_string(static_cast<std::uint16_t>(expected)) +
                           " was expected (written by another component)");
  }
}

bool RecordReader::next(RecordView& out) noexcept {
  // Lengths were all validated by the constructor; these reads stay in bounds.
  if (pos_ >= body_.size()) return false;
  const std::size_t key_len = load_u32(body_.data() + pos_);
  out.key = body_.substr(pos_ + 4, key_len);
  pos_ += 4 + key_len;
  const std::size_t value_len = load_u32(body_.data() + pos_);
  out.value = body_.substr(pos_ + 4, value_len);
  pos_ += 4 + value_len;
  return true;
}

std::string encode_records(std::uint16_t kind, const std::vector<RecordView>& records) {
  std::size_t payload = 0;
  for (const auto& r : records) payload += kRecordEntryOverhead + r.key.size() + r.value.size();
  RecordWriter writer(kind, payload);
  for (const auto& r : records) writer.add(r.key, r.value);
  return std::move(writer).finish();
}

}  // namespace streamstate
