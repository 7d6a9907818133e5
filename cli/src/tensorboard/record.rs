//! TFRecord framing, the container of a TensorBoard event file: each record is
//! `u64 length (LE) | masked crc32c(length) | payload | masked crc32c(payload)`.

use std::io::{self, Write};

/// The mask TFRecord applies to every CRC, so a CRC stored inside data that is itself
/// checksummed does not cancel out.
pub fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Appends one record holding `payload`.
pub fn write_record(out: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    let len = (payload.len() as u64).to_le_bytes();
    out.write_all(&len)?;
    out.write_all(&masked_crc(&len).to_le_bytes())?;
    out.write_all(payload)?;
    out.write_all(&masked_crc(payload).to_le_bytes())
}

/// Splits a whole file into its records' payloads, checking both CRCs of each; for the tests,
/// which read back what the writer made.
#[cfg(test)]
pub fn read_records(mut data: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    fn take<'a>(data: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], String> {
        if data.len() < n {
            return Err(format!("truncated {what}: {} bytes left, {n} needed", data.len()));
        }
        let (head, rest) = data.split_at(n);
        *data = rest;
        Ok(head)
    }
    let crc = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
    let mut records = Vec::new();
    while !data.is_empty() {
        let len_bytes = take(&mut data, 8, "length")?;
        if crc(take(&mut data, 4, "length crc")?) != masked_crc(len_bytes) {
            return Err(format!("record {}: length crc mismatch", records.len()));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        let payload = take(&mut data, usize::try_from(len).map_err(|e| e.to_string())?, "payload")?;
        if crc(take(&mut data, 4, "payload crc")?) != masked_crc(payload) {
            return Err(format!("record {}: payload crc mismatch", records.len()));
        }
        records.push(payload.to_vec());
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // crc32c("") = 0 masks to the constant; crc32c("123456789") = 0xe3069283 is the
        // Castagnoli check value, masked by hand: ((c >> 15) | (c << 17)) + 0xa282ead8 (mod 2^32).
        assert_eq!(masked_crc(b""), 0xa282_ead8);
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
    }

    #[test]
    fn records_round_trip_and_corruption_is_caught() {
        let mut buf = Vec::new();
        write_record(&mut buf, b"first").unwrap();
        write_record(&mut buf, b"").unwrap();
        write_record(&mut buf, &[7u8; 300]).unwrap();
        assert_eq!(buf.len(), 3 * 16 + 5 + 300);
        let records = read_records(&buf).unwrap();
        assert_eq!(records, vec![b"first".to_vec(), Vec::new(), vec![7u8; 300]]);

        let mut bad = buf.clone();
        bad[12] ^= 1; // the first payload's first byte
        assert!(read_records(&bad).unwrap_err().contains("payload crc"));
        let mut bad = buf.clone();
        bad[0] ^= 1; // the first length
        assert!(read_records(&bad).unwrap_err().contains("length crc"));
        assert!(read_records(&buf[..buf.len() - 1]).unwrap_err().contains("truncated"));
    }
}
