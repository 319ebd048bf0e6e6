//! Base36 numbers, the text form of node ids and of join tokens' parts (as Docker writes
//! them), pure.

/// Big-endian bytes → lowercase base36, left-padded with zeros to `width`.
pub fn encode_base36(bytes: &[u8], width: usize) -> String {
    let mut num: Vec<u8> = bytes.to_vec();
    let mut digits = Vec::new();
    while num.iter().any(|&b| b != 0) {
        let mut rem = 0u32;
        for b in num.iter_mut() {
            let cur = (rem << 8) | u32::from(*b);
            *b = (cur / 36) as u8;
            rem = cur % 36;
        }
        digits.push(DIGITS[rem as usize]);
    }
    while digits.len() < width {
        digits.push(b'0');
    }
    digits.reverse();
    String::from_utf8(digits).unwrap_or_default()
}

const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// Base36 (either case) → `N` big-endian bytes; `None` on a bad digit or overflow.
pub fn decode_base36<const N: usize>(text: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    for c in text.bytes() {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'z' => c - b'a' + 10,
            b'A'..=b'Z' => c - b'A' + 10,
            _ => return None,
        };
        let mut carry = u32::from(d);
        for b in out.iter_mut().rev() {
            let cur = u32::from(*b) * 36 + carry;
            *b = (cur & 0xff) as u8;
            carry = cur >> 8;
        }
        if carry != 0 {
            return None;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_overflow() {
        let id = 0x0123_4567_89ab_cdef_u64.to_be_bytes();
        let text = encode_base36(&id, 13);
        assert_eq!(text.len(), 13);
        assert_eq!(decode_base36::<8>(&text), Some(id));
        assert_eq!(decode_base36::<8>(&text.to_uppercase()), Some(id));
        assert_eq!(decode_base36::<1>("zz"), None, "36^2 - 1 does not fit a byte");
        assert_eq!(decode_base36::<8>("not base36!"), None);
    }
}
