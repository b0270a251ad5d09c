//! Event pages: the events one group commit accepted, many to a sled value.
//!
//! sled keeps a record in memory for every tree node, cached or not (page
//! table slot, page box, log position, LRU and segment accounting: about
//! 100 bytes), and a leaf holds at most 32 keys. With a key per event, a
//! backlog held in the store cost RAM per queued event (4.5 bytes measured
//! with a million queued). A page holds up to [`PAGE_BYTES`] of one group's
//! event records under the id of its first event (`b` + id), so a leaf
//! holds a few hundred events instead of 32: RSS with one to six million
//! events queued no longer grows (README, "How fast").
//!
//! The writer gives events ids that rise from page to page (see
//! [`Filling::assign`]), so the page holding event `id` is the last page
//! keyed at or below `id`: one reverse step in sled, no index.
//!
//! A page is written once. An event whose record changes after (a retry,
//! a dead letter, a replay) gets a record of its own under `r` + id that
//! wins over its page's copy (see [`super::keys::REWRITTEN`]). Retention
//! removes a page when all of its events are collected, and rewrites it
//! without the collected ones before that.
//!
//! Layout: format byte, event count (u16, big-endian), then per event its
//! id (16 bytes) and the end offset of its record (u32, big-endian), then
//! the records ([`super::event_format`]) back to back.

use uuid::Uuid;

use super::event_format;
use super::keys;
use super::StoreError;
use crate::model::EventRecord;

/// A page is closed once its records reach this many bytes: 32 keys of
/// this under sled's blob threshold (a quarter of a 512 KiB segment), so a
/// leaf of pages of ordinary events is still written to the log inline
/// (a page may pass it by one event of up to 64 KiB; such a leaf goes to a
/// blob file, which herald's sled syncs too).
pub(crate) const PAGE_BYTES: usize = 3 * 1024;

/// The first byte of a page: the layout's version.
const FORMAT: u8 = 1;
/// Bytes before the index: format and count.
const HEADER: usize = 1 + 2;
/// Bytes of one index entry: id and end offset.
const INDEX_ENTRY: usize = 16 + 4;

/// A page as stored, read in place.
pub(crate) struct Page<'a> {
    key: &'a [u8],
    index: &'a [u8],
    records: &'a [u8],
}

impl<'a> Page<'a> {
    /// Reads a page's header and index; a record's own damage shows when it
    /// is read.
    pub(crate) fn parse(key: &'a [u8], bytes: &'a [u8]) -> Result<Page<'a>, StoreError> {
        let corrupt = |reason: String| StoreError::corrupt(key, format!("event page: {reason}"));
        match bytes.first() {
            Some(&FORMAT) => {}
            Some(other) => return Err(corrupt(format!("unknown format byte {other:#04x}"))),
            None => return Err(corrupt("empty".into())),
        }
        let count = bytes
            .get(1..HEADER)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
            .ok_or_else(|| corrupt("cut short in its header".into()))?;
        let index_end = HEADER + count * INDEX_ENTRY;
        let (Some(index), Some(records)) = (bytes.get(HEADER..index_end), bytes.get(index_end..))
        else {
            return Err(corrupt(format!(
                "{count} events announced, {} bytes is too short for their index",
                bytes.len()
            )));
        };
        Ok(Page {
            key,
            index,
            records,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.index.len() / INDEX_ENTRY
    }

    /// The id of the `i`th event (`i < len()`).
    pub(crate) fn id(&self, i: usize) -> Uuid {
        let at = i * INDEX_ENTRY;
        let mut id = [0u8; 16];
        id.copy_from_slice(&self.index[at..at + 16]);
        Uuid::from_bytes(id)
    }

    fn end(&self, i: usize) -> usize {
        let at = i * INDEX_ENTRY + 16;
        let b = &self.index[at..at + 4];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
    }

    pub(crate) fn last_id(&self) -> Option<Uuid> {
        self.len().checked_sub(1).map(|i| self.id(i))
    }

    /// Where event `id` is in this page.
    pub(crate) fn find(&self, id: Uuid) -> Option<usize> {
        let (mut low, mut high) = (0, self.len());
        while low < high {
            let mid = (low + high) / 2;
            match self.id(mid).cmp(&id) {
                std::cmp::Ordering::Less => low = mid + 1,
                std::cmp::Ordering::Greater => high = mid,
                std::cmp::Ordering::Equal => return Some(mid),
            }
        }
        None
    }

    /// The stored bytes of the `i`th event's record.
    pub(crate) fn raw(&self, i: usize) -> Result<&'a [u8], StoreError> {
        let start = match i {
            0 => 0,
            _ => self.end(i - 1),
        };
        let end = self.end(i);
        self.records.get(start..end).ok_or_else(|| {
            StoreError::corrupt(
                self.key,
                format!(
                    "event page: event {} claims bytes {start}..{end} of {}",
                    self.id(i),
                    self.records.len()
                ),
            )
        })
    }

    /// The `i`th event.
    pub(crate) fn record(&self, i: usize) -> Result<EventRecord, StoreError> {
        let event = event_format::decode(self.key, self.raw(i)?)?;
        if event.id != self.id(i) {
            return Err(StoreError::corrupt(
                self.key,
                format!(
                    "event page: the record filed as event {} is event {}",
                    self.id(i),
                    event.id
                ),
            ));
        }
        Ok(event)
    }
}

/// A page of `records` (ascending ids, each with its encoded record).
pub(crate) fn encode<'r>(
    records: impl ExactSizeIterator<Item = (Uuid, &'r [u8])> + Clone,
) -> Vec<u8> {
    let count = records.len();
    let bytes: usize = records.clone().map(|(_, r)| r.len()).sum();
    let mut out = Vec::with_capacity(HEADER + count * INDEX_ENTRY + bytes);
    out.push(FORMAT);
    // Pages are closed at PAGE_BYTES, so far fewer than 65,536 events.
    out.extend_from_slice(&(count as u16).to_be_bytes());
    let mut end = 0usize;
    for (id, record) in records.clone() {
        end += record.len();
        out.extend_from_slice(id.as_bytes());
        // An event is capped at ingest far below 4 GiB.
        out.extend_from_slice(&(end as u32).to_be_bytes());
    }
    for (_, record) in records {
        out.extend_from_slice(record);
    }
    out
}

/// The smallest id above `id`: the next value of its random bits, which
/// keeps a UUIDv7 a UUIDv7 (and, were they all ones, the next millisecond).
fn after(id: Uuid) -> Uuid {
    const RANDOM_B: u128 = (1 << 62) - 1;
    let n = id.as_u128();
    if n & RANDOM_B != RANDOM_B {
        return Uuid::from_u128(n + 1);
    }
    let next_ms = (n >> 80) as u64 + 1;
    uuid::Builder::from_unix_timestamp_millis(next_ms, &[0; 10]).into_uuid()
}

/// The pages one group commit fills, and the ids it gives its events.
pub(crate) struct Filling {
    /// The highest event id given so far, in this group or before.
    last: Uuid,
    /// Pages closed: (key, value).
    closed: Vec<(Vec<u8>, Vec<u8>)>,
    /// The records of the page being filled, in id order.
    open: Vec<(Uuid, Vec<u8>)>,
    open_bytes: usize,
}

impl Filling {
    /// A group's filling, giving ids above `last` (the highest stored).
    pub(crate) fn new(last: Uuid) -> Filling {
        Filling {
            last,
            closed: Vec::new(),
            open: Vec::new(),
            open_bytes: 0,
        }
    }

    /// The id an event that ingest named `proposed` is stored under:
    /// `proposed` if it is above every id given so far, else the next one
    /// up. Ingest's ids come from one monotonic clock, so this only moves
    /// an event whose request reached the writer after a later one's (or
    /// after the wall clock stepped back across a restart).
    pub(crate) fn assign(&mut self, proposed: Uuid) -> Uuid {
        let id = if proposed > self.last {
            proposed
        } else {
            after(self.last)
        };
        self.last = id;
        id
    }

    /// The highest event id given so far.
    pub(crate) fn last(&self) -> Uuid {
        self.last
    }

    /// Adds an event (its id from [`Filling::assign`], so above every one
    /// added before).
    pub(crate) fn add(&mut self, event: &EventRecord) {
        let record = event_format::encode(event);
        self.open_bytes += record.len();
        self.open.push((event.id, record));
        if self.open_bytes >= PAGE_BYTES {
            self.close();
        }
    }

    fn close(&mut self) {
        let Some(&(first, _)) = self.open.first() else {
            return;
        };
        let page = encode(self.open.iter().map(|(id, r)| (*id, r.as_slice())));
        self.closed.push((keys::event_page(first).to_vec(), page));
        self.open.clear();
        self.open_bytes = 0;
    }

    /// An event added to this group, if `id` is one.
    pub(crate) fn get(&self, id: Uuid) -> Result<Option<EventRecord>, StoreError> {
        if let Ok(i) = self.open.binary_search_by_key(&id, |(id, _)| *id) {
            return event_format::decode(&keys::event_page(id), &self.open[i].1).map(Some);
        }
        for (key, value) in &self.closed {
            let page = Page::parse(key, value)?;
            if let Some(i) = page.find(id) {
                return page.record(i).map(Some);
            }
        }
        Ok(None)
    }

    /// Whether no event was added.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty() && self.closed.is_empty()
    }

    /// The group's pages, for its batch.
    pub(crate) fn finish(mut self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.close();
        self.closed
    }
}

/// The page that would hold event `id`: the last one keyed at or below it.
pub(crate) fn page_for(
    db: &sled::Db,
    id: Uuid,
) -> Result<Option<(sled::IVec, sled::IVec)>, StoreError> {
    Ok(db
        .range([keys::EVENT_PAGE].as_slice()..=keys::event_page(id).as_slice())
        .next_back()
        .transpose()?)
}

/// Event `id` from the pages in `db`.
pub(crate) fn find(db: &sled::Db, id: Uuid) -> Result<Option<EventRecord>, StoreError> {
    let Some((key, value)) = page_for(db, id)? else {
        return Ok(None);
    };
    let page = Page::parse(&key, &value)?;
    page.find(id).map(|i| page.record(i)).transpose()
}

/// The highest event id stored: new events are given ids above it.
pub(crate) fn last_stored(db: &sled::Db) -> Result<Uuid, StoreError> {
    let mut last = Uuid::nil();
    if let Some(item) = db.scan_prefix([keys::EVENT]).next_back() {
        let (key, _) = item?;
        last = last.max(keys::id_of(&key).unwrap_or_default());
    }
    if let Some(item) = db.scan_prefix([keys::EVENT_PAGE]).next_back() {
        let (key, value) = item?;
        let newest = match Page::parse(&key, &value) {
            Ok(page) => page.last_id(),
            Err(e) => {
                // Its events are lost to reads either way; the rest of the
                // store still serves. Ids from the clock pass its first one.
                tracing::error!(error = %e, "the newest event page is unreadable");
                keys::id_of(&key)
            }
        };
        last = last.max(newest.unwrap_or_default());
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Priority;
    use crate::store::testing;
    use proptest::prelude::*;

    fn events(n: usize) -> Vec<EventRecord> {
        (0..n)
            .map(|i| testing::event(&format!("lock-{i}"), Priority::Normal))
            .collect()
    }

    fn filled(events: &[EventRecord]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut filling = Filling::new(Uuid::nil());
        for event in events {
            filling.add(event);
        }
        filling.finish()
    }

    #[test]
    fn events_come_back_from_the_page_that_holds_them() {
        let mut all = events(40);
        let mut filling = Filling::new(Uuid::nil());
        for event in &mut all {
            event.id = filling.assign(event.id);
        }
        let pages = filled(&all);
        assert!(pages.len() > 1, "40 events fill more than one page");
        for event in &all {
            // The last page keyed at or below the id holds it.
            let (key, value) = pages
                .iter()
                .rev()
                .find(|(k, _)| k.as_slice() <= keys::event_page(event.id).as_slice())
                .expect("a page");
            let page = Page::parse(key, value).expect("parse");
            let i = page.find(event.id).expect("in its page");
            assert_eq!(
                event_format::encode(&page.record(i).expect("decode")),
                event_format::encode(event)
            );
        }
    }

    #[test]
    fn ids_rise_from_event_to_event_whatever_ingest_proposed() {
        let mut filling = Filling::new(Uuid::nil());
        let late = Uuid::now_v7();
        let later = Uuid::now_v7();
        assert_eq!(filling.assign(later), later);
        let moved = filling.assign(late);
        assert!(moved > later, "a late request's event goes after");
        assert_eq!(moved.get_version_num(), 7, "still a UUIDv7");
        assert_eq!(filling.assign(later), after(moved));
        // Random bits all ones: the next millisecond.
        let full = Uuid::from_u128(later.as_u128() | ((1 << 62) - 1));
        let next = after(full);
        assert!(next > full);
        assert_eq!(next.get_version_num(), 7);
    }

    #[test]
    fn damage_is_reported_with_the_page_key_and_what_is_wrong() {
        let all = events(2);
        let (key, value) = filled(&all).remove(0);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "empty"),
            (vec![9, 0, 1], "unknown format byte 0x09"),
            (vec![FORMAT, 0], "cut short"),
            (value[..20].to_vec(), "too short for their index"),
            (value[..value.len() - 1].to_vec(), "claims bytes"),
        ];
        for (bytes, want) in cases {
            let err = Page::parse(&key, &bytes)
                .and_then(|page| (0..page.len()).try_for_each(|i| page.record(i).map(drop)))
                .expect_err(want);
            let text = err.to_string();
            assert!(text.contains(want), "{text}");
            assert!(text.contains(&format!("b/{}", all[0].id)), "{text}");
        }
    }

    proptest! {
        #[test]
        fn any_group_splits_into_pages_that_keep_every_event(n in 1usize..60, data_len in 0usize..900) {
            let mut all = events(n);
            let mut filling = Filling::new(Uuid::nil());
            for event in &mut all {
                event.id = filling.assign(event.id);
                event.data = serde_json::value::RawValue::from_string(format!("\"{}\"", "x".repeat(data_len))).expect("json");
                filling.add(event);
            }
            for event in &all {
                prop_assert!(filling.get(event.id).expect("staged").is_some());
            }
            let pages = filling.finish();
            let mut seen = Vec::new();
            for (key, value) in &pages {
                let page = Page::parse(key, value).expect("parse");
                prop_assert_eq!(keys::id_of(key), Some(page.id(0)));
                for i in 0..page.len() {
                    seen.push(page.record(i).expect("decode").id);
                }
                // Closed once over the limit: at most one record past it.
                prop_assert!(page.len() == 1 || value.len() < PAGE_BYTES + 2 * (data_len + 400));
            }
            prop_assert_eq!(seen, all.iter().map(|e| e.id).collect::<Vec<_>>());
        }
    }
}
