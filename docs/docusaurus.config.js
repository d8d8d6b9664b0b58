// Docusaurus site for the DeepSpeed CNN examples. Docs only (no blog), served at the site root.
// Pages are plain Markdown: `format: 'detect'` parses .md files as CommonMark, so a bare `<` or `{`
// in text or tables is just text; an .mdx file would still be parsed as MDX and fail the build on errors.

const {themes: prismThemes} = require('prism-react-renderer'); // dark code blocks (a dependency of preset-classic)

/** @type {import('@docusaurus/types').Config} */
const config = {
  title: 'DeepSpeed CNN examples',
  tagline: 'Image-classification CNNs trained with DeepSpeed, from one GPU (or a CPU) to several nodes',
  url: 'https://example.invalid',
  baseUrl: '/',
  trailingSlash: true,
  onBrokenLinks: 'throw',
  onBrokenAnchors: 'throw',
  onDuplicateRoutes: 'throw',
  markdown: {
    format: 'detect',
    hooks: {onBrokenMarkdownLinks: 'throw', onBrokenMarkdownImages: 'throw'},
  },
  i18n: {defaultLocale: 'en', locales: ['en']},
  presets: [
    [
      'classic',
      /** @type {import('@docusaurus/preset-classic').Options} */
      ({
        docs: {routeBasePath: '/', sidebarPath: './sidebars.js'},
        blog: false,
        pages: false,
        theme: {customCss: './src/css/custom.css'},
      }),
    ],
  ],
  themeConfig: {
    navbar: {
      title: 'DeepSpeed CNN examples',
      items: [{type: 'docSidebar', sidebarId: 'docs', position: 'left', label: 'Docs'}],
    },
    colorMode: {respectPrefersColorScheme: false},
    prism: {theme: prismThemes.vsDark, additionalLanguages: ['bash']},
  },
};

module.exports = config;
