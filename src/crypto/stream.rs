//! Files too large to seal at once (Bulk Data export files): a sequence of sealed chunks, each
//! `length (u32, big endian) ‖ sealed chunk`. Every chunk's AAD names the file, the chunk's
//! position and whether it is the last, so a chunk moved, dropped, swapped in from another file
//! or cut off the end makes the file fail to open. Memory stays one chunk whatever the size.

use super::{Aad, Cipher, CryptoError, Sealed};
use std::io::{Read, Write};

/// Plaintext bytes per chunk.
pub const CHUNK_BYTES: usize = 256 * 1024;

const TABLE: &str = "sealed_file";

fn aad<'a>(file_id: &'a str, index: u64, last: bool) -> Aad<'a> {
    Aad {
        table: TABLE,
        resource_type: "chunk",
        logical_id: file_id,
        version_id: (index as i64) * 2 + i64::from(last),
    }
}

/// Errors of a sealed file: its storage, or its contents.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("sealed file: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

/// Writes plaintext as sealed chunks; [`SealedWriter::finish`] seals the last one (a file
/// never finished does not open).
pub struct SealedWriter<'c, W: Write> {
    cipher: &'c Cipher,
    file_id: String,
    out: W,
    buf: Vec<u8>,
    index: u64,
    /// Sealed bytes written so far.
    pub written: u64,
}

impl<'c, W: Write> SealedWriter<'c, W> {
    pub fn new(cipher: &'c Cipher, file_id: &str, out: W) -> Self {
        SealedWriter {
            cipher,
            file_id: file_id.to_string(),
            out,
            buf: Vec::with_capacity(CHUNK_BYTES),
            index: 0,
            written: 0,
        }
    }

    pub fn write_all(&mut self, mut bytes: &[u8]) -> Result<(), StreamError> {
        while !bytes.is_empty() {
            let room = CHUNK_BYTES - self.buf.len();
            let take = room.min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.buf.len() == CHUNK_BYTES {
                self.seal_chunk(false)?;
            }
        }
        Ok(())
    }

    fn seal_chunk(&mut self, last: bool) -> Result<(), StreamError> {
        let sealed = self.cipher.seal(&aad(&self.file_id, self.index, last), &self.buf)?;
        let bytes = sealed.as_bytes();
        let len = u32::try_from(bytes.len()).map_err(|_| CryptoError::TooLarge)?;
        self.out.write_all(&len.to_be_bytes())?;
        self.out.write_all(bytes)?;
        self.written += 4 + bytes.len() as u64;
        self.buf.clear();
        self.index += 1;
        Ok(())
    }

    /// Seals what is buffered as the last chunk and returns the output.
    pub fn finish(mut self) -> Result<W, StreamError> {
        self.seal_chunk(true)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Reads a sealed file chunk by chunk.
pub struct SealedReader<'c, R: Read> {
    cipher: &'c Cipher,
    file_id: String,
    input: R,
    index: u64,
    done: bool,
}

impl<'c, R: Read> SealedReader<'c, R> {
    pub fn new(cipher: &'c Cipher, file_id: &str, input: R) -> Self {
        SealedReader {
            cipher,
            file_id: file_id.to_string(),
            input,
            index: 0,
            done: false,
        }
    }

    /// The next chunk's plaintext; `None` after the last. A file cut short, extended or
    /// reordered fails with an authentication error.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, StreamError> {
        let mut len = [0u8; 4];
        if self.done {
            // nothing may follow the last chunk
            return match self.input.read(&mut len)? {
                0 => Ok(None),
                _ => Err(CryptoError::Authentication.into()),
            };
        }
        if let Err(e) = self.input.read_exact(&mut len) {
            return Err(match e.kind() {
                // the last chunk never came: cut off
                std::io::ErrorKind::UnexpectedEof => CryptoError::Authentication.into(),
                _ => e.into(),
            });
        }
        let len = u32::from_be_bytes(len) as usize;
        // a chunk is at most CHUNK_BYTES of plaintext plus the version, nonce and tag
        if len > CHUNK_BYTES + 64 {
            return Err(CryptoError::Malformed.into());
        }
        let mut sealed = vec![0u8; len];
        self.input.read_exact(&mut sealed).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => StreamError::Crypto(CryptoError::Authentication),
            _ => e.into(),
        })?;
        let sealed = Sealed::from_stored(sealed);
        // not last, else last: the AAD says which, so a cut after any chunk is caught
        let plain = match self.cipher.open(&aad(&self.file_id, self.index, false), &sealed) {
            Ok(p) => p,
            Err(CryptoError::Authentication) => {
                let p = self.cipher.open(&aad(&self.file_id, self.index, true), &sealed)?;
                self.done = true;
                p
            }
            Err(e) => return Err(e.into()),
        };
        self.index += 1;
        Ok(Some(plain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(cipher: &Cipher, id: &str, plain: &[u8]) -> Vec<u8> {
        let mut w = SealedWriter::new(cipher, id, Vec::new());
        w.write_all(plain).unwrap();
        w.finish().unwrap()
    }

    fn open_all(cipher: &Cipher, id: &str, bytes: &[u8]) -> Result<Vec<u8>, StreamError> {
        let mut r = SealedReader::new(cipher, id, bytes);
        let mut out = Vec::new();
        while let Some(chunk) = r.next_chunk()? {
            out.extend(chunk);
        }
        Ok(out)
    }

    #[test]
    fn round_trips_across_chunks_and_refuses_any_change() {
        let cipher = crate::crypto::test_cipher();
        let plain: Vec<u8> = (0..(CHUNK_BYTES * 2 + 1000)).map(|i| (i % 251) as u8).collect();
        let file = sealed(&cipher, "job/1", &plain);
        assert_eq!(open_all(&cipher, "job/1", &file).unwrap(), plain);
        assert!(!file.windows(64).any(|w| w == &plain[..64]), "no plaintext in the file");
        // an empty file is one (empty, last) chunk
        assert_eq!(open_all(&cipher, "e", &sealed(&cipher, "e", b"")).unwrap(), b"");
        // another file's name
        assert!(open_all(&cipher, "job/2", &file).is_err());
        // cut after the first chunk (a whole chunk boundary), or mid-chunk
        let first = 4 + u32::from_be_bytes(file[..4].try_into().unwrap()) as usize;
        assert!(open_all(&cipher, "job/1", &file[..first]).is_err());
        assert!(open_all(&cipher, "job/1", &file[..file.len() - 10]).is_err());
        // something appended after the last chunk
        let mut longer = file.clone();
        longer.extend_from_slice(&file[..first]);
        assert!(open_all(&cipher, "job/1", &longer).is_err());
        // chunks swapped
        let second_len = 4 + u32::from_be_bytes(file[first..first + 4].try_into().unwrap()) as usize;
        let mut swapped = file[first..first + second_len].to_vec();
        swapped.extend_from_slice(&file[..first]);
        swapped.extend_from_slice(&file[first + second_len..]);
        assert!(open_all(&cipher, "job/1", &swapped).is_err());
        // a flipped bit
        let mut flipped = file.clone();
        flipped[first + 40] ^= 1;
        assert!(open_all(&cipher, "job/1", &flipped).is_err());
    }
}
