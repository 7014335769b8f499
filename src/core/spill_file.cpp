#include "core/spill_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>

#include "core/checksum.h"
#include "core/errors.h"

namespace streamstate {
namespace {

[[noreturn]] void throw_io(const std::string& action, const std::string& path, int error) {
  throw SpillIoError("spill: cannot " + action + " '" + path + "': " + std::strerror(error), path,
                     error);
}

std::string file_header(SpillKeyType key_type) {
  std::string h(kSpillMagic, sizeof kSpillMagic);
  put_u16(h, kSpillFormatVersion);
  h.push_back(static_cast<char>(key_type));
  h.push_back('\0');
  put_u32(h, crc32c_mask(crc32c(h)));
  return h;
}

[[nodiscard]] std::uint64_t bits_of(double v) noexcept {
  std::uint64_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

// The shortest record: tag, an empty bytes key (its u32 length) and a singleton's f64.
constexpr std::uint32_t kMinRecordSize = 1 + 4 + 8;

void close_fd(int& fd) noexcept {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

// O_NOFOLLOW refuses a symlink; this refuses what else could stand in for a spill file (a
// FIFO, a device, another user's file hard-linked in): EPERM, as for a refused open.
void require_own_file(int fd, const std::string& path) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw_io("stat spill file", path, errno);
  if (!S_ISREG(st.st_mode) || st.st_uid != ::geteuid() || st.st_nlink != 1) {
    throw SpillIoError("spill: '" + path + "' is not a spill file this process wrote (a " +
                           (S_ISREG(st.st_mode) ? "file of uid " + std::to_string(st.st_uid) +
                                                      " with " + std::to_string(st.st_nlink) +
                                                      " links"
                                                : std::string("non-regular file")) +
                           "); refusing to use it",
                       path, EPERM);
  }
}

}  // namespace

bool spill_is_singleton(const Moments& m) noexcept {
  if (m.count != 1) return false;
  Moments rebuilt;
  rebuilt.add(m.shift);
  // Bit patterns, not ==, so NaN payloads and signed zeros round-trip exactly.
  return bits_of(rebuilt.sum) == bits_of(m.sum) && bits_of(rebuilt.min) == bits_of(m.min) &&
         bits_of(rebuilt.max) == bits_of(m.max) && bits_of(rebuilt.dsum) == bits_of(m.dsum) &&
         bits_of(rebuilt.dsq) == bits_of(m.dsq);
}

namespace {

void encode_body(std::string& out, const Moments& m) {
  if (spill_is_singleton(m)) {
    put_f64(out, m.shift);
  } else {
    m.encode(out);
  }
}

[[nodiscard]] char tag_of(const Moments& m) noexcept {
  return static_cast<char>(spill_is_singleton(m) ? kSpillTagSingleton : kSpillTagPartial);
}

}  // namespace

void spill_encode_record(std::string& out, std::int64_t key, const Moments& m) {
  out.push_back(tag_of(m));
  put_u64(out, static_cast<std::uint64_t>(key));
  encode_body(out, m);
}

void spill_encode_record(std::string& out, std::string_view key, const Moments& m) {
  if (key.size() > std::numeric_limits<std::uint32_t>::max()) {
    throw InvalidArgument("spill: a key longer than 4 GiB cannot be spilled");
  }
  out.push_back(tag_of(m));
  put_u32(out, static_cast<std::uint32_t>(key.size()));
  out.append(key);
  encode_body(out, m);
}

// ---------------------------------------------------------------------------------------
// SpillRunWriter

SpillRunWriter::SpillRunWriter(std::string path, SpillKeyType key_type, std::string& buffer,
                               std::size_t block_bytes, std::uint64_t existing_size)
    : path_(std::move(path)), buffer_(buffer), block_bytes_(block_bytes) {
  const bool create = existing_size == 0;
  fd_ = create ? ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600)
               : ::open(path_.c_str(), O_WRONLY | O_APPEND | O_NOFOLLOW | O_CLOEXEC);
  if (fd_ < 0) throw_io("open spill file", path_, errno);
  try {
    if (!create) {
      require_own_file(fd_, path_);
      struct stat st {};
      if (::fstat(fd_, &st) != 0) throw_io("stat spill file", path_, errno);
      if (static_cast<std::uint64_t>(st.st_size) != existing_size) {
        throw CorruptDataError("spill file '" + path_ + "' is damaged: it is " +
                               std::to_string(st.st_size) + " bytes but " +
                               std::to_string(existing_size) + " were written");
      }
      start_size_ = existing_size;
    } else {
      write_all(file_header(key_type));
    }
  } catch (...) {
    // A file that is not what earlier runs left is not touched, only let go.
    if (create) {
      discard_run();
    } else {
      close_fd(fd_);
    }
    throw;
  }
  start_block();
}

SpillRunWriter::~SpillRunWriter() {
  // Unwinding from a failed write: drop the partial run so the file still holds only
  // whole runs. Best effort; the aggregator is poisoned after an I/O error anyway.
  if (!finished_ && fd_ >= 0) discard_run();
  buffer_.clear();
}

void SpillRunWriter::discard_run() noexcept {
  if (start_size_ == 0) {
    // Created by this run: by name, but the name is ours (created exclusively, in a
    // directory only this user can write).
    ::unlink(path_.c_str());
  } else if (fd_ >= 0) {
    [[maybe_unused]] const int rc = ::ftruncate(fd_, static_cast<off_t>(start_size_));
  }
  close_fd(fd_);
}

void SpillRunWriter::start_block() {
  buffer_.clear();
  buffer_.append(kSpillBlockHeaderSize, '\0');
  block_records_ = 0;
}

void SpillRunWriter::flush_block() {
  if (block_records_ == 0) return;
  const std::size_t payload = buffer_.size() - kSpillBlockHeaderSize;
  if (payload > std::numeric_limits<std::uint32_t>::max()) {
    throw InvalidArgument("spill: a block over 4 GiB cannot be written");
  }
  char* head = buffer_.data();
  store_u32(head, static_cast<std::uint32_t>(payload));
  store_u32(head + 4, block_records_);
  std::uint32_t crc = crc32c(std::string_view(head, 8));
  crc = crc32c(std::string_view(head + kSpillBlockHeaderSize, payload), crc);
  store_u32(head + 8, crc32c_mask(crc));
  write_all(buffer_);
  start_block();
}

void SpillRunWriter::write_all(std::string_view data) {
  while (!data.empty()) {
    const ssize_t n = ::write(fd_, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_io("write spill file", path_, errno);
    }
    if (n == 0) throw_io("write spill file", path_, ENOSPC);
    data.remove_prefix(static_cast<std::size_t>(n));
    written_ += static_cast<std::uint64_t>(n);
  }
}

std::uint64_t SpillRunWriter::finish() {
  flush_block();
  const int fd = fd_;
  fd_ = -1;
  // close() can report a deferred write error (NFS, quota): that run did not make it.
  if (::close(fd) != 0 && errno != EINTR) {
    const int error = errno;
    if (start_size_ == 0) {
      ::unlink(path_.c_str());
    } else {
      const int again = ::open(path_.c_str(), O_WRONLY | O_NOFOLLOW | O_CLOEXEC);
      if (again >= 0) {
        [[maybe_unused]] const int rc = ::ftruncate(again, static_cast<off_t>(start_size_));
        ::close(again);
      }
    }
    throw_io("close spill file", path_, error);
  }
  finished_ = true;
  buffer_.clear();
  return written_;
}

// ---------------------------------------------------------------------------------------
// SpillFileReader

SpillFileReader::SpillFileReader(std::string path, SpillKeyType key_type, std::string& buffer,
                                 std::uint64_t expected_size)
    : path_(std::move(path)), key_type_(key_type), buffer_(buffer) {
  fd_ = ::open(path_.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd_ < 0) throw_io("open spill file", path_, errno);
  try {
    require_own_file(fd_, path_);
  } catch (...) {
    close_fd(fd_);
    throw;
  }
  struct stat st {};
  if (::fstat(fd_, &st) != 0) {
    const int error = errno;
    close_fd(fd_);
    throw_io("stat spill file", path_, error);
  }
  file_size_ = static_cast<std::uint64_t>(st.st_size);
  try {
    if (file_size_ != expected_size) {
      corrupt("the file is " + std::to_string(file_size_) + " bytes but " +
              std::to_string(expected_size) + " were written");
    }
    char header[kSpillFileHeaderSize];
    if (file_size_ < kSpillFileHeaderSize) corrupt("truncated header");
    read_exact(header, sizeof header);
    if (std::memcmp(header, kSpillMagic, sizeof kSpillMagic) != 0) corrupt("bad magic");
    const std::uint32_t stored = crc32c_unmask(load_u32(header + 8));
    if (stored != crc32c(std::string_view(header, 8))) corrupt("header checksum mismatch");
    if (load_u16(header + 4) != kSpillFormatVersion) {
      corrupt("unsupported version " + std::to_string(load_u16(header + 4)));
    }
    if (static_cast<std::uint8_t>(header[6]) != static_cast<std::uint8_t>(key_type_)) {
      corrupt("written for another key type");
    }
  } catch (...) {
    close_fd(fd_);
    throw;
  }
}

SpillFileReader::~SpillFileReader() {
  close_fd(fd_);
  buffer_.clear();
}

void SpillFileReader::corrupt(const std::string& what) const {
  throw CorruptDataError("spill file '" + path_ + "' is damaged: " + what + " (block at byte " +
                         std::to_string(block_offset_) + ")");
}

void SpillFileReader::read_exact(char* dst, std::size_t n) {
  while (n > 0) {
    const ssize_t got = ::read(fd_, dst, n);
    if (got < 0) {
      if (errno == EINTR) continue;
      throw_io("read spill file", path_, errno);
    }
    if (got == 0) corrupt("unexpected end of file");
    dst += got;
    n -= static_cast<std::size_t>(got);
    offset_ += static_cast<std::uint64_t>(got);
  }
}

bool SpillFileReader::load_block() {
  if (offset_ == file_size_) return false;
  block_offset_ = offset_;
  if (file_size_ - offset_ < kSpillBlockHeaderSize) corrupt("truncated block header");
  char head[kSpillBlockHeaderSize];
  read_exact(head, sizeof head);
  const std::uint32_t payload = load_u32(head);
  const std::uint32_t records = load_u32(head + 4);
  // The length is checked against the file before anything is allocated for it.
  if (payload > file_size_ - offset_) corrupt("block length runs past the end of the file");
  if (records == 0 || records > payload / kMinRecordSize) corrupt("impossible record count");
  buffer_.resize(payload);
  read_exact(buffer_.data(), payload);
  std::uint32_t crc = crc32c(std::string_view(head, 8));
  crc = crc32c(buffer_, crc);
  if (crc != crc32c_unmask(load_u32(head + 8))) corrupt("CRC32C mismatch");
  block_ = ByteReader(buffer_, "spill block");
  block_left_ = records;
  return true;
}

bool SpillFileReader::advance() {
  while (block_left_ == 0) {
    if (!block_.at_end()) corrupt("bytes after the last record");
    if (!load_block()) return false;
  }
  --block_left_;
  return true;
}

void SpillFileReader::read_body(std::uint8_t tag, Moments& m) {
  if (tag == kSpillTagSingleton) {
    m = Moments{};
    m.add(block_.f64());
  } else {
    m = Moments::decode(block_);
  }
}

std::uint8_t SpillFileReader::read_tag() {
  const auto tag = static_cast<std::uint8_t>(block_.take(1)[0]);
  if (tag != kSpillTagSingleton && tag != kSpillTagPartial) {
    throw CorruptDataError("unknown record tag " + std::to_string(tag));
  }
  return tag;
}

bool SpillFileReader::next(std::int64_t& key, Moments& m) {
  if (key_type_ != SpillKeyType::kInt64) {
    throw InvalidArgument("spill: reading int64 keys from a bytes-key file");
  }
  if (!advance()) return false;
  try {
    const std::uint8_t tag = read_tag();
    key = static_cast<std::int64_t>(block_.u64());
    read_body(tag, m);
  } catch (const CorruptDataError& e) {
    corrupt(e.what());
  }
  return true;
}

bool SpillFileReader::next(std::string_view& key, Moments& m) {
  if (key_type_ != SpillKeyType::kBytes) {
    throw InvalidArgument("spill: reading bytes keys from an int64-key file");
  }
  if (!advance()) return false;
  try {
    const std::uint8_t tag = read_tag();
    key = block_.take(block_.u32());
    read_body(tag, m);
  } catch (const CorruptDataError& e) {
    corrupt(e.what());
  }
  return true;
}

}  // namespace streamstate
