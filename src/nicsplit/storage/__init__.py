"""Storage under the journal and the images: the durable file interface
(`durable`), at-rest keys (`atrest`), and disk images behind one `Image`
interface (`base`): `image.open_image` opens a plain (`image.PlainImage`)
or sealed (`sealed.SealedImage`) image; `rekey` re-seals one under a new
key; `blob` seals small byte strings; `sealing` is what those share."""
