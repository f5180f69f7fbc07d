//! Messages as the providers see them: a push task renders its messages' records one after
//! another into one buffer ([`MessageBuf`]), and hands the providers a view of it
//! ([`Messages`]) — nothing is listed or copied per message; a [`Message`] is made when one is
//! asked for.

use std::ops::Range;

/// A message ready to push: a view of its delivery record, rendered once (see
/// [`crate::render`]) into a buffer its push task owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// The recipient.
    pub user: u32,
    /// The [`crate::model::Delivery`] record as one line of JSON (no newline), UTF-8 bytes as
    /// they go on the wire: what `log:` writes, what `http` posts, what batches are sized by.
    /// (Bytes, not `&str`: a task's records are cut from one buffer, and a `str` slice would
    /// read a byte at every cut to check it is a character boundary.)
    pub json: &'a [u8],
    /// The recipient's push token, for providers that address devices.
    pub token: Option<&'a str>,
}

impl Message<'_> {
    /// The delivery record plus `"error"` and `"attempts"`: a dead letter (SPEC).
    pub fn dead_letter(&self, error: &str, attempts: u32) -> String {
        let error = serde_json::to_string(error).unwrap_or_else(|_| "\"\"".into());
        let head = self.json.strip_suffix(b"}").unwrap_or(self.json);
        let head = String::from_utf8_lossy(head);
        format!("{head},\"error\":{error},\"attempts\":{attempts}}}")
    }
}

/// Messages rendered one after another into one buffer: what a push task owns.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MessageBuf {
    users: Vec<u32>,
    records: Vec<u8>,
    /// Where each record ends in `records`.
    ends: Vec<usize>,
    /// Each message's push token, or none at all where the provider needs none.
    tokens: Vec<Option<String>>,
}

impl MessageBuf {
    /// The messages to `users` whose records end at `ends` in `records` (ascending: each
    /// record begins where the one before ends), with `tokens` (one each, or none). `None` if
    /// the parts do not fit together. (A record whose end comes before its beginning reads as
    /// empty.)
    pub fn new(
        users: Vec<u32>,
        records: Vec<u8>,
        ends: Vec<usize>,
        tokens: Vec<Option<String>>,
    ) -> Option<Self> {
        let fits = ends.len() == users.len()
            && (tokens.is_empty() || tokens.len() == users.len())
            && ends.last().is_none_or(|&end| end <= records.len());
        fits.then_some(MessageBuf {
            users,
            records,
            ends,
            tokens,
        })
    }

    /// The buffer the records were rendered into, for the next messages to reuse.
    pub fn into_records(self) -> Vec<u8> {
        self.records
    }

    /// A view of every message.
    pub fn messages(&self) -> Messages<'_> {
        Messages {
            users: &self.users,
            records: &self.records,
            ends: &self.ends,
            start: 0,
            tokens: &self.tokens,
        }
    }
}

/// Copies of the messages, in order (tokens kept only if every message has a place for one:
/// a view's tokens are all there or none are).
impl<'a> FromIterator<Message<'a>> for MessageBuf {
    fn from_iter<I: IntoIterator<Item = Message<'a>>>(messages: I) -> Self {
        let mut buf = MessageBuf::default();
        let mut tokens = Vec::new();
        for m in messages {
            buf.users.push(m.user);
            buf.records.extend_from_slice(m.json);
            buf.ends.push(buf.records.len());
            tokens.push(m.token.map(str::to_owned));
        }
        if tokens.iter().any(Option::is_some) {
            buf.tokens = tokens;
        }
        buf
    }
}

/// A push task's messages, or a stretch of them: each a view of its record in the buffer the
/// task rendered them into ([`MessageBuf`]).
#[derive(Debug, Clone, Copy)]
pub struct Messages<'a> {
    users: &'a [u32],
    records: &'a [u8],
    /// Where each message's record ends in `records`; the first begins at `start`.
    ends: &'a [usize],
    start: usize,
    /// Each message's push token, or empty where the provider needs none.
    tokens: &'a [Option<String>],
}

impl<'a> Messages<'a> {
    /// How many.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Their recipients, in order.
    pub fn users(&self) -> &'a [u32] {
        self.users
    }

    /// Message `i` (panics past the end, as a slice's index does).
    pub fn get(&self, i: usize) -> Message<'a> {
        Message {
            user: self.users[i],
            json: self
                .records
                .get(self.begin(i)..self.ends[i])
                .unwrap_or_default(),
            token: self.tokens.get(i).and_then(|t| t.as_deref()),
        }
    }

    /// Where message `i`'s record begins.
    fn begin(&self, i: usize) -> usize {
        match i {
            0 => self.start,
            _ => self.ends[i - 1],
        }
    }

    /// Messages `range` of these (panics past the end, as a slice's range does).
    pub fn slice(&self, range: Range<usize>) -> Messages<'a> {
        Messages {
            users: &self.users[range.clone()],
            records: self.records,
            ends: &self.ends[range.clone()],
            start: self.begin(range.start),
            tokens: match self.tokens.is_empty() {
                true => self.tokens,
                false => &self.tokens[range],
            },
        }
    }

    /// Each message, in order.
    pub fn iter(&self) -> impl Iterator<Item = Message<'a>> + 'a {
        let all = *self;
        (0..all.len()).map(move |i| all.get(i))
    }

    /// The size of message `i`'s record, in bytes.
    pub fn record_len(&self, i: usize) -> usize {
        self.ends[i].saturating_sub(self.begin(i))
    }

    /// The size of all their records, in bytes.
    pub fn bytes(&self) -> usize {
        self.ends
            .last()
            .map_or(0, |end| end.saturating_sub(self.start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Views and stretches of views read back what was put in, tokens with their messages,
    /// and a copy of a stretch is the stretch.
    #[test]
    fn views_and_stretches_read_back_the_messages_put_in() {
        let records = ["{\"a\":1}", "", "{\"热\":\"卖\"}", "{}"];
        let users = [7, 3, 9, 11];
        let tokens = [Some("t7"), None, Some("t9"), Some("t11")];
        let buf: MessageBuf = (users.iter().zip(records).zip(tokens))
            .map(|((&user, json), token)| Message {
                user,
                json: json.as_bytes(),
                token,
            })
            .collect();
        let all = buf.messages();
        assert_eq!(all.len(), 4);
        assert_eq!(all.users(), &users);
        for (i, m) in all.iter().enumerate() {
            assert_eq!(
                (m.user, m.json, m.token),
                (users[i], records[i].as_bytes(), tokens[i])
            );
            assert_eq!(all.record_len(i), records[i].len());
        }
        assert_eq!(all.bytes(), records.concat().len());
        assert_eq!(all.slice(1..3).bytes(), records[1].len() + records[2].len());
        assert_eq!(all.slice(2..2).bytes(), 0);
        for range in [0..4, 1..3, 2..4, 3..3, 0..1] {
            let part = all.slice(range.clone());
            let want: Vec<Message<'_>> = range.clone().map(|i| all.get(i)).collect();
            assert_eq!(part.iter().collect::<Vec<_>>(), want, "{range:?}");
            let copy: MessageBuf = part.iter().collect();
            assert_eq!(copy.messages().iter().collect::<Vec<_>>(), want);
            // A stretch of a stretch.
            if part.len() >= 2 {
                assert_eq!(part.slice(1..2).get(0), all.get(range.start + 1));
            }
        }
        // Without tokens, a copy keeps none; parts that do not fit are refused.
        let plain: MessageBuf = all.iter().map(|m| Message { token: None, ..m }).collect();
        assert!(plain.messages().iter().all(|m| m.token.is_none()));
        assert!(MessageBuf::new(vec![1, 2], b"ab".to_vec(), vec![1], vec![]).is_none());
        assert!(MessageBuf::new(vec![1], b"ab".to_vec(), vec![3], vec![]).is_none());
        // Ends out of order read as an empty record, never a panic.
        let back = MessageBuf::new(vec![1, 2], b"ab".to_vec(), vec![2, 1], vec![]).unwrap();
        assert_eq!(back.messages().get(1).json, b"");
        assert_eq!(back.messages().slice(1..2).bytes(), 0);
        assert!(MessageBuf::new(vec![1], b"ab".to_vec(), vec![2], vec![None, None]).is_none());
        let two = MessageBuf::new(vec![1, 2], b"ab".to_vec(), vec![1, 2], vec![]).unwrap();
        assert_eq!(two.messages().get(1).json, b"b");
    }
}
